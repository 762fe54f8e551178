#!/bin/sh
# miio_client_helper.sh: the helper script of miio_client (LOCAL_API.md §9), an example to adapt.
#
# It says `_internal.helper_ready` once, then loops: `miio_recv_line` says hello to the daemon and
# prints the one message the daemon has for it; the script answers with `miio_send_line`.
#
#   _internal.request_dinfo       identity from device.conf in the data dir the daemon names
#   _internal.request_dtoken      the token: no wifi.conf -> forget device.token (not for did 0, which is
#                                 online without one, L§16); a valid device.token -> answer it; else
#                                 store the daemon's ntoken (mode 0600) and answer it.
#                                 device.country, when present, is sent first (response_dcountry)
#   _internal.req_wifi_conf_status 1 when wifi.conf exists, else 0
#   _internal.info                hw_ver, fw_ver (os-release <VENDOR>_VERSION), ap (wpa_cli status, else
#                                 the ssid of wifi.conf), netif (ip, else ifconfig/route; else "")
#   _internal.wifi_start          the time zone, then up to 5 runs of wifi_start.sh 3 s apart, then
#                                 _internal.wifi_connected or _internal.wifi_ap_mode (vendor §6.4)
#   _internal.config_tz           relinks the time zone link to the zoneinfo file (vendor §5.2)
#   _internal.wifi_reconnect|reload  `wifi_start.sh reconnect|reload` in the background (L§13)
#   _internal.req_didkeymac       (did 0 or 1, L§16) no material of its own: params null
#   _internal.req_didkeymac2      stores the assigned did and key in device.conf (the did= and key=
#                                 lines replaced, every other line kept, one rename), runs
#                                 `wifi_start.sh rehost` (the DHCP hostname carries the did), then "ok"
#
# Everything else is ignored (the daemon falls back to its own data after its timeout).
# Needs: a POSIX sh (BusyBox ash, dash), miio_recv_line and miio_send_line, and printf, tr, cat,
# cp, mv, rm, ln, sleep (all in BusyBox's defconfig; nothing else, so a minimal BusyBox runs it).
# Optional: wpa_cli, ip or ifconfig and route (for _internal.info; each skipped when absent).
# POSIX sh (BusyBox ash, dash). No string from the daemon or the network goes through eval or an
# unquoted expansion, and every value put into JSON is escaped (D15).
#
# Environment (all optional):
#   MIIO_BIN_DIR     dir of miio_recv_line and miio_send_line (default: found on PATH)
#   MIIO_LOCAL_PORT  the daemon's port, read by the line tools (default 54322)
#   MIIO_DATADIR     data dir until the daemon names one (default /etc/miio/)
#   MIIO_WIFI_START  wifi_start.sh (default /etc/miio/wifi_start.sh)
#   MIIO_WIFI_TRIES  runs of wifi_start.sh per _internal.wifi_start (default 5)
#   MIIO_WIFI_PAUSE  seconds between them (default 3)
#   MIIO_WIFI_CONF_WAIT  after wifi_ap_mode, the longest wait in seconds for the daemon to delete or
#                    restore wifi.conf (default 5); the change ends the wait at once
#   MIIO_OS_RELEASE  os-release (default /etc/os-release)
#   MIIO_TZ_LINK     the link config_tz rewrites: /etc/localtime (glibc), /etc/TZ (uClibc) or the
#                    writable file they point to on a read-only root (default /etc/localtime)
#   MIIO_TZ_DIR      zoneinfo dir (default /usr/share/zoneinfo; uClibc: /usr/share/zoneinfo/uclibc)
#   MIIO_IFACE       Wi-Fi interface (default wlan0)
#   MIIO_WPA_CLI, MIIO_IP, MIIO_IFCONFIG, MIIO_ROUTE   the commands for _internal.info
#                    (default wpa_cli, ip, ifconfig, route; each used only when present)

LC_ALL=C
export LC_ALL

BIN=${MIIO_BIN_DIR:+${MIIO_BIN_DIR%/}/}
RECV=${BIN}miio_recv_line
SEND=${BIN}miio_send_line
DATADIR=${MIIO_DATADIR:-/etc/miio/}
WIFI_START=${MIIO_WIFI_START:-/etc/miio/wifi_start.sh}
WIFI_TRIES=${MIIO_WIFI_TRIES:-5}
WIFI_PAUSE=${MIIO_WIFI_PAUSE:-3}
WIFI_CONF_WAIT=${MIIO_WIFI_CONF_WAIT:-5}
OS_RELEASE=${MIIO_OS_RELEASE:-/etc/os-release}
TZ_LINK=${MIIO_TZ_LINK:-/etc/localtime}
TZ_DIR=${MIIO_TZ_DIR:-/usr/share/zoneinfo}
IFACE=${MIIO_IFACE:-wlan0}
WPA_CLI=${MIIO_WPA_CLI:-wpa_cli}
IP=${MIIO_IP:-ip}
IFCONFIG=${MIIO_IFCONFIG:-ifconfig}
ROUTE=${MIIO_ROUTE:-route}

TAB=$(printf '\t')
CR=$(printf '\r')

log() {
	printf 'miio_client_helper: %s\n' "$*" >&2
}

# send JSON: one message to the daemon. The log names the method only: answers carry secrets.
send() {
	"$SEND" "$1" || log "cannot send ${1%%,*}"
}

have() {
	command -v "$1" >/dev/null 2>&1
}

# trim S: sets t to S without leading and trailing blanks.
trim() {
	t=$1
	while :; do
		case $t in
		" "* | "$TAB"*) t=${t#?} ;;
		*" " | *"$TAB") t=${t%?} ;;
		*) break ;;
		esac
	done
}

# esc S: sets e to S as the body of a JSON string: \ and " escaped, control characters dropped.
esc() {
	case $1 in
	*[\\\"[:cntrl:]]*) ;;
	*)
		e=$1
		return
		;;
	esac
	s=$1 e=
	while [ -n "$s" ]; do
		c=${s%"${s#?}"}
		s=${s#?}
		case $c in
		\\ | \") e=$e\\$c ;;
		[[:cntrl:]]) ;;
		*) e=$e$c ;;
		esac
	done
}

# field KEY JSON: sets v to the string value of the first "KEY":"..." member, with \" and \\ undone
# (other escapes lose their backslash). Returns 1 when there is none. Inside a JSON string every "
# is escaped, so "KEY":" can only match a real member.
field() {
	v=
	case $2 in
	*"\"$1\":\""*) ;;
	*) return 1 ;;
	esac
	s=${2#*"\"$1\":\""}
	while [ -n "$s" ]; do
		c=${s%"${s#?}"}
		s=${s#?}
		case $c in
		\\)
			c=${s%"${s#?}"}
			s=${s#?}
			;;
		\") return 0 ;;
		esac
		v=$v$c
	done
}

# conf_get FILE KEY: sets v to the value of the last KEY= line (key and value trimmed, CR dropped,
# '#' lines skipped), as the daemon reads these files. Returns 1 when there is none.
conf_get() {
	v=
	found=
	[ -r "$1" ] || return 1
	while IFS= read -r line || [ -n "$line" ]; do
		line=${line%"$CR"}
		case $line in
		*=*) ;;
		*) continue ;;
		esac
		trim "${line%%=*}"
		[ "$t" = "$2" ] || continue
		trim "${line#*=}"
		v=$t
		found=1
	done <"$1"
	[ -n "$found" ]
}

# unquote S: sets v to S without one pair of surrounding quotes; inside "...", \" and \\ are undone
# (wifi.conf, L§17).
unquote() {
	case $1 in
	\'*\')
		v=${1#\'}
		v=${v%\'}
		return
		;;
	\"*\") ;;
	*)
		v=$1
		return
		;;
	esac
	s=${1#\"}
	s=${s%\"}
	v=
	while [ -n "$s" ]; do
		c=${s%"${s#?}"}
		s=${s#?}
		if [ "$c" = \\ ] && [ -n "$s" ]; then
			c=${s%"${s#?}"}
			s=${s#?}
		fi
		v=$v$c
	done
}

# is_token S: 16 characters [0-9A-Za-z] (L§9.3).
is_token() {
	case $1 in
	*[!0-9A-Za-z]*) return 1 ;;
	esac
	[ ${#1} -eq 16 ]
}

# read_token FILE: sets tok to the token in FILE (16 characters, or 32 hex digits of 16 such
# characters; trailing blanks ignored), or to "" when FILE holds no such token.
read_token() {
	tok=
	IFS= read -r line <"$1" || [ -n "$line" ] || return 0
	trim "${line%"$CR"}"
	if is_token "$t"; then
		tok=$t
		return 0
	fi
	case $t in
	*[!0-9A-Fa-f]*) return 0 ;;
	esac
	[ ${#t} -eq 32 ] || return 0
	# Octal escapes for printf, from our own digits only.
	h=$t fmt=
	while [ -n "$h" ]; do
		n=$((0x${h%"${h#??}"}))
		h=${h#??}
		fmt=$fmt\\$((n / 64))$((n / 8 % 8))$((n % 8))
	done
	# shellcheck disable=SC2059
	t=$(printf "$fmt")
	if is_token "$t"; then tok=$t; fi
}

# store_token FILE TOKEN: atomically, mode 0600 (L§17).
store_token() {
	tmp=$1.tmp.$$
	if (umask 077 && printf '%s' "$2" >"$tmp") && mv -f "$tmp" "$1"; then
		return 0
	fi
	rm -f "$tmp"
	return 1
}

# datadir_from KEY JSON: takes the data dir the daemon names (it always ends with /).
datadir_from() {
	if field "$1" "$2" && [ -n "$v" ]; then
		DATADIR=$v
	fi
}

on_dinfo() {
	datadir_from params "$1"
	f=${DATADIR}device.conf
	if [ ! -r "$f" ]; then
		log "$f: missing"
		return
	fi
	conf_get "$f" did
	did=
	case $v in
	0 | [1-9]*) case $v in *[!0-9]*) ;; *) did=$v ;; esac ;;
	esac
	if [ -z "$did" ]; then
		# Not a plain number: passed on as a string, for the daemon to judge and report.
		esc "$v"
		did="\"$e\""
	fi
	conf_get "$f" key
	esc "$v"
	key=$e
	conf_get "$f" mac
	esc "$v"
	mac=$e
	conf_get "$f" vendor
	esc "$v"
	vendor=$e
	conf_get "$f" model
	esc "$v"
	model=$e
	send "{\"method\":\"_internal.response_dinfo\",\"params\":{\"did\":$did,\"key\":\"$key\",\"vendor\":\"$vendor\",\"mac\":\"$mac\",\"model\":\"$model\"}}"
}

on_dtoken() {
	datadir_from dir "$1"
	field ntoken "$1"
	ntoken=$v
	tf=${DATADIR}device.token
	# Not provisioned (a reset, L§15): the old token goes, so the device is unbound. A did 0 device
	# is online without wifi.conf and keeps its token (L§16).
	if [ ! -e "${DATADIR}wifi.conf" ]; then
		conf_get "${DATADIR}device.conf" did || v=
		[ "$v" = 0 ] || rm -f "$tf"
	fi
	tok=
	if [ -r "$tf" ]; then
		read_token "$tf"
	fi
	if [ -z "$tok" ]; then
		if ! is_token "$ntoken"; then
			log "request_dtoken without a valid ntoken"
			return
		fi
		store_token "$tf" "$ntoken" || log "cannot write $tf; the token will change on restart"
		tok=$ntoken
	fi
	cf=${DATADIR}device.country
	if [ -r "$cf" ]; then
		IFS= read -r line <"$cf" || :
		trim "${line%"$CR"}"
		case $t in
		'' | *[!a-z]*) ;;
		*) [ ${#t} -le 7 ] && send "{\"method\":\"_internal.response_dcountry\",\"params\":\"$t\"}" ;;
		esac
	fi
	send "{\"method\":\"_internal.response_dtoken\",\"params\":\"$tok\"}"
}

# A dynamic did (L§16 step 1): this example has no material for the cloud.
on_didkeymac() {
	send '{"method":"_internal.res_didkeymac","params":null}'
}

# on_didkeymac2 JSON: L§16 step 4. The did= and key= lines of device.conf are replaced (every other
# line, its CR and the file's mode kept) in a copy that is renamed over the file, so a crash leaves
# the old file or the new one. Anything odd is logged and left to the daemon, which stores the pair
# itself when no "ok" comes. Then the DHCP hostname, which carries the did (vendor §7), follows.
on_didkeymac2() {
	datadir_from dir "$1"
	ndid=${1#*\"did\":}
	ndid=${ndid%%[!0-9]*}
	case $ndid in
	'' | 0 | 1 | 0*) log "req_didkeymac2 without a did"; return ;;
	esac
	field key "$1" || v=
	nkey=$v
	if ! is_token "$nkey"; then
		log "req_didkeymac2 without a valid key"
		return
	fi
	f=${DATADIR}device.conf
	tmp=${f}.tmp.$$
	if ! cp -p "$f" "$tmp" 2>/dev/null; then
		log "$f: cannot copy; the daemon stores the new identity"
		rm -f "$tmp"
		return
	fi
	sd= sk=
	while IFS= read -r line || [ -n "$line" ]; do
		body=${line%"$CR"}
		end=${line#"$body"}
		case $body in
		*=*) trim "${body%%=*}" ;;
		*) t= ;;
		esac
		case $t in
		did) printf 'did=%s%s\n' "$ndid" "$end"; sd=1 ;;
		key) printf 'key=%s%s\n' "$nkey" "$end"; sk=1 ;;
		*) printf '%s\n' "$line" ;;
		esac
	done <"$f" >"$tmp" || { rm -f "$tmp"; log "$f: cannot write"; return; }
	{ [ -n "$sd" ] || printf 'did=%s\n' "$ndid"; [ -n "$sk" ] || printf 'key=%s\n' "$nkey"; } >>"$tmp"
	if ! mv -f "$tmp" "$f"; then
		rm -f "$tmp"
		log "$f: cannot replace; the daemon stores the new identity"
		return
	fi
	# udhcpc restarts under the new hostname before the "ok", not after: the restart takes the
	# address away for a moment (deconfig, see wifi_start.sh), and right after the "ok" the daemon
	# opens its new cloud session, asks `_internal.info` (the address) and announces mDNS under the
	# new did; run first, all of that finds the address back. The restart returns in about 7 s at
	# worst, typically well under one, inside the daemon's 10 s; were it later, the daemon would
	# store the same pair again itself, which changes nothing. stdout to /dev/null: the udhcpc left
	# in the background must not hold ours.
	MIIO_DATADIR=$DATADIR "$WIFI_START" rehost </dev/null >/dev/null || log "wifi_start.sh rehost failed"
	send '{"method":"_internal.res_didkeymac2","params":"ok"}'
}

on_wifi_status() {
	datadir_from params "$1"
	if [ -e "${DATADIR}wifi.conf" ]; then st=1; else st=0; fi
	send "{\"method\":\"_internal.res_wifi_conf_status\",\"params\":$st}"
}

# mask_of PREFIX: sets mask to the dotted netmask of a prefix length (0..32), else "".
mask_of() {
	mask=
	case $1 in
	'' | *[!0-9]*) return ;;
	esac
	[ "$1" -le 32 ] || return
	p=$1 i=0
	while [ $i -lt 4 ]; do
		if [ "$p" -ge 8 ]; then
			o=255
			p=$((p - 8))
		else
			o=$((256 - (1 << (8 - p))))
			p=0
		fi
		mask=$mask${mask:+.}$o
		i=$((i + 1))
	done
}

# netif: sets lip, mask and gw of IFACE from ip, else from ifconfig and route; "" when unknown.
netif() {
	lip='' mask='' gw=''
	if have "$IP"; then
		out=$("$IP" -4 addr show dev "$IFACE" 2>/dev/null)
		while IFS= read -r line; do
			trim "$line"
			case $t in
			"inet "*)
				a=${t#inet }
				a=${a%% *}
				lip=${a%/*}
				mask_of "${a#*/}"
				break
				;;
			esac
		done <<EOF
$out
EOF
		out=$("$IP" -4 route show default 2>/dev/null)
		case $out in
		"default via "*)
			gw=${out#default via }
			gw=${gw%% *}
			;;
		esac
		return
	fi
	if have "$IFCONFIG"; then
		out=$("$IFCONFIG" "$IFACE" 2>/dev/null)
		while IFS= read -r line; do
			trim "$line"
			case $t in
			"inet addr:"*)
				a=${t#inet addr:}
				lip=${a%% *}
				case $t in *Mask:*)
					mask=${t##*Mask:}
					mask=${mask%% *}
					;;
				esac
				break
				;;
			"inet "*)
				a=${t#inet }
				lip=${a%% *}
				case $t in *"netmask "*)
					mask=${t##*netmask }
					mask=${mask%% *}
					;;
				esac
				break
				;;
			esac
		done <<EOF
$out
EOF
	fi
	if have "$ROUTE"; then
		out=$("$ROUTE" -n 2>/dev/null)
		while IFS= read -r line; do
			case $line in
			"0.0.0.0 "*)
				trim "${line#0.0.0.0}"
				gw=${t%% *}
				break
				;;
			esac
		done <<EOF
$out
EOF
	fi
}

on_info() {
	fw=unknown
	if conf_get "${DATADIR}device.conf" vendor && [ -n "$v" ]; then
		vend=$(printf '%s' "$v" | tr '[:lower:]' '[:upper:]')
		if conf_get "$OS_RELEASE" "${vend}_VERSION"; then
			unquote "$v"
			if [ -n "$v" ]; then fw=$v; fi
		fi
	fi
	ssid='' bssid=''
	if have "$WPA_CLI"; then
		out=$("$WPA_CLI" -i "$IFACE" status 2>/dev/null)
		while IFS= read -r line; do
			case $line in
			ssid=*) ssid=${line#ssid=} ;;
			bssid=*) bssid=${line#bssid=} ;;
			esac
		done <<EOF
$out
EOF
	fi
	if [ -z "$ssid" ] && conf_get "${DATADIR}wifi.conf" ssid; then
		unquote "$v"
		ssid=$v
	fi
	netif
	esc "$fw"
	fw=$e
	esc "$ssid"
	ssid=$e
	esc "$bssid"
	bssid=$e
	esc "$lip"
	lip=$e
	esc "$mask"
	mask=$e
	esc "$gw"
	gw=$e
	send "{\"method\":\"_internal.info\",\"partner_id\":\"\",\"params\":{\"hw_ver\":\"Linux\",\"fw_ver\":\"$fw\",\"ap\":{\"ssid\":\"$ssid\",\"bssid\":\"$bssid\"},\"netif\":{\"localIp\":\"$lip\",\"mask\":\"$mask\",\"gw\":\"$gw\"}}}"
}

# valid_tz TZ: a zoneinfo name (D15): 1-64 bytes of [A-Za-z0-9_+./-], not absolute, no empty, . or
# .. component.
valid_tz() {
	case $1 in
	'' | /* | */ | *//* | . | .. | ./* | ../* | */. | */.. | */./* | */../*) return 1 ;;
	*[!A-Za-z0-9_+./-]*) return 1 ;;
	esac
	[ ${#1} -le 64 ]
}

set_tz() {
	if ! valid_tz "$1"; then
		log "illegal tz"
		return 1
	fi
	if [ ! -f "$TZ_DIR/$1" ]; then
		log "no zone $1 in $TZ_DIR"
		return 1
	fi
	ln -sf "$TZ_DIR/$1" "$TZ_LINK" || log "cannot link $TZ_LINK"
}

on_wifi_start() {
	datadir_from datadir "$1"
	if field tz "$1" && [ -n "$v" ]; then
		set_tz "$v"
	fi
	# wifi_start.sh reads the credentials from wifi.conf, which the daemon has just written.
	wc=${DATADIR}wifi.conf
	# The content itself, not a checksum: BusyBox builds often lack cksum (Debian's busybox-static does).
	was=$(cat "$wc" 2>/dev/null)
	n=0
	while [ "$n" -lt "$WIFI_TRIES" ]; do
		n=$((n + 1))
		if MIIO_DATADIR=$DATADIR "$WIFI_START" </dev/null; then
			send '{"method":"_internal.wifi_connected"}'
			return
		fi
		log "wifi_start.sh failed (try $n of $WIFI_TRIES)"
		if [ "$n" -lt "$WIFI_TRIES" ]; then sleep "$WIFI_PAUSE"; fi
	done
	send '{"method":"_internal.wifi_ap_mode","params":null}'
	# The daemon now deletes wifi.conf (back to AP mode) or restores the previous one (a router
	# password change). Wait a little for that, then bring up whatever it left.
	i=0
	while [ "$i" -lt "$WIFI_CONF_WAIT" ] && [ "$(cat "$wc" 2>/dev/null)" = "$was" ]; do
		sleep 1
		i=$((i + 1))
	done
	MIIO_DATADIR=$DATADIR "$WIFI_START" </dev/null || log "wifi_start.sh failed"
}

# wifi_bg reconnect|reload: in the background, so the daemon is heard again at once (vendor §9).
wifi_bg() {
	MIIO_DATADIR=$DATADIR "$WIFI_START" "$1" </dev/null >/dev/null 2>&1 &
}

send '{"method":"_internal.helper_ready"}'
while :; do
	if ! BUF=$("$RECV") || [ -z "$BUF" ]; then
		# The daemon is not (yet) there, or restarting.
		sleep 1
		continue
	fi
	case $BUF in
	*'"method":"_internal.request_dinfo"'*) on_dinfo "$BUF" ;;
	*'"method":"_internal.request_dtoken"'*) on_dtoken "$BUF" ;;
	*'"method":"_internal.req_wifi_conf_status"'*) on_wifi_status "$BUF" ;;
	*'"method":"_internal.info"'*) on_info ;;
	*'"method":"_internal.wifi_start"'*) on_wifi_start "$BUF" ;;
	*'"method":"_internal.config_tz"'*) field tz "$BUF" && set_tz "$v" ;;
	*'"method":"_internal.wifi_reconnect"'*) wifi_bg reconnect ;;
	*'"method":"_internal.wifi_reload"'*) wifi_bg reload ;;
	*'"method":"_internal.req_didkeymac"'*) on_didkeymac ;;
	*'"method":"_internal.req_didkeymac2"'*) on_didkeymac2 "$BUF" ;;
	esac
done
