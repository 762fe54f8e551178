#!/bin/sh
# ota_download.sh URL FILE: miio_ota's download command (LOCAL_API.md §14). Fetches URL into FILE
# and prints `progress N` lines (0..100) on stdout as it goes. miio_ota checks the md5 itself,
# kills the whole process group on its --download-timeout or on SIGTERM, and removes FILE after
# any failure.
#
# Exit status (miio_ota maps it to the vendor's code, L§14):
#   0  FILE is complete
#   2  the host name did not resolve                          -> -33002 dns error
#   3  no connection (refused, unreachable, timed out)        -> -33003 connect error
#   4  the transfer was cut (closed early, reset, timed out)  -> -33004 disconnect
#   1  anything else (an HTTP error status, a full disk, ...) -> -33001 down error
# BusyBox wget exits 1 for all of these alike; the script tells them apart by wget's messages
# (BusyBox's and GNU wget's wording).
#
# Needs: a POSIX sh (BusyBox ash), `tr`, and a wget on PATH (or WGET=/path/to/wget): BusyBox wget
# (1.2x or later) or GNU wget. http always works. https works only where the board's wget speaks
# TLS: BusyBox built with FEATURE_WGET_HTTPS (its own TLS, no certificate check) or
# FEATURE_WGET_OPENSSL (then `openssl` or the `ssl_client` applet must be on PATH), or GNU wget
# with TLS. Without it an https URL fails with exit 1 or 4 (-33001/-33004).
#
# URL and FILE come from the cloud (through miio_ota) and arrive as separate arguments. They are
# only ever expanded inside double quotes and handed to wget as single arguments: nothing in them
# (`;`, `$()`, backquotes, quotes) is ever run or split.

url=$1
file=$2
if [ -z "$url" ] || [ -z "$file" ]; then
	echo "usage: $0 URL FILE" >&2
	exit 1
fi

rm -f -- "$file"
# wget writes its messages and its progress meter (updates separated by \r) to stderr; its exit
# status rides along as a last line. The reader below runs in the pipeline's last process and
# its exit status is the script's.
{
	"${WGET:-wget}" -O "$file" -- "$url" 2>&1
	echo "ota-wget-exit $?"
} | tr '\r' '\n' | {
	last=-1
	why=1
	rc=1
	while IFS= read -r line; do
		case $line in
		"ota-wget-exit "*)
			rc=${line#ota-wget-exit }
			;;
		*"bad address"* | *"unable to resolve host"* | *"Name or service not known"*)
			why=2
			echo "$line" >&2
			;;
		*"download timed out"* | *"closed prematurely"* | *"short read"* | *"Connection reset"* | \
			*"error getting response"* | *"Read error"* | *"Connection closed at byte"*)
			why=4
			echo "$line" >&2
			;;
		*"can't connect"* | *"Connection refused"* | *"timed out"* | *"unreachable"* | \
			*"No route to host"*)
			why=3
			echo "$line" >&2
			;;
		*%*)
			# A progress meter line: the number before the first '%'.
			p=${line%%%*}
			p=${p##* }
			case $p in
			'' | *[!0-9]*) ;;
			*)
				if [ "$p" != "$last" ]; then
					echo "progress $p"
					last=$p
				fi
				;;
			esac
			;;
		esac
	done
	if [ "$rc" = 0 ]; then
		exit 0
	fi
	exit "$why"
}
