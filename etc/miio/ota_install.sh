#!/bin/sh
# ota_install.sh FILE: miio_ota's install command (LOCAL_API.md §14). A reference to adapt to the
# board: how a firmware is written is the maker's.
#
# FILE has been downloaded and its md5 checked. Environment:
#   MIIO_OTA_MODE  normal | silent (silent: the device stays quiet, no sound or light)
#   MIIO_OTA_MD5   the package's md5, lower-case hex
#   MIIO_OTA_WORK  where the package is unpacked (default: FILE's dir + /pkg)
#   MIIO_OTA_REBOOT  1 (default): reboot 5 s after a successful install
# Exit status: 0 installed; 7 the battery is too low (-33007 low energy); anything else -> -33005
# install error. miio_ota never interrupts this script, not even on SIGTERM (a cut flash write can
# brick the board), so every step here must end by itself.
#
# This reference takes FILE to be one package (vendor §十.5: several files travel as one): a tar
# archive, gzip-compressed or not, with an executable `install.sh` at its top, which it runs in the
# unpacked dir with the same environment. Replace the body with the board's own step
# (`sysupgrade "$1"`, `mtd write "$1" firmware`, an A/B switch) where that fits better.
#
# Needs: a POSIX sh (BusyBox ash), tar (with -z for gzip packages), rm, mkdir.

file=$1
if [ -z "$file" ] || [ ! -f "$file" ]; then
	echo "usage: $0 FILE" >&2
	exit 1
fi
work=${MIIO_OTA_WORK:-$(dirname -- "$file")/pkg}

rm -rf -- "$work"
mkdir -p -- "$work" || exit 1
if ! tar -xzf "$file" -C "$work" 2>/dev/null && ! tar -xf "$file" -C "$work"; then
	echo "ota_install.sh: $file is not a tar package" >&2
	rm -rf -- "$work"
	exit 1
fi
if [ ! -f "$work/install.sh" ]; then
	echo "ota_install.sh: the package has no install.sh" >&2
	rm -rf -- "$work"
	exit 1
fi
(cd "$work" && sh ./install.sh)
rc=$?
rm -rf -- "$work"
if [ "$rc" = 0 ] && [ "${MIIO_OTA_REBOOT:-1}" = 1 ]; then
	# After miio_ota has reported `installed`; the next start is `idle` with the new fw_ver.
	(sleep 5 && reboot) >/dev/null 2>&1 </dev/null &
fi
exit "$rc"
