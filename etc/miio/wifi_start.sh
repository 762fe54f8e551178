#!/bin/sh
# wifi_start.sh: brings the Wi-Fi up for miio_client (vendor §5.2, §6, §7; LOCAL_API.md §8, §9.6).
# An example to adapt to the board.
#
#   wifi_start.sh            STA when wifi.conf exists in the data dir, AP (provisioning) otherwise
#   wifi_start.sh sta | ap   that mode
#   wifi_start.sh reconnect  reassociate (wpa_cli), or restart STA (offline notice, L§13)
#   wifi_start.sh reload     reload the Wi-Fi driver (MIIO_WIFI_MODULE, when set), then restart STA
#   wifi_start.sh rehost     restart our udhcpc under the DHCP hostname of the did now in device.conf,
#                            asking for the address the interface has (after a did/key assignment,
#                            L§16); nothing when no udhcpc of ours runs or the hostname is the same
#
# Exit 0 when the mode is up (STA: associated and a DHCP lease; rehost: udhcpc restarted or nothing
# to do), else non-zero.
#
# STA: the credentials come from wifi.conf (ssid="…", psk="…", key_mgmt=WPA|NONE; \" and \\ escaped),
# never from the command line; the SSID goes to wpa_supplicant in hex, so no character of it can
# break the config. The DHCP hostname is `<model, . -> ->_miio<did>` (vendor §7), so a Xiaomi router
# can push a new password. AP: an open network named `<model, . -> ->_miap<last two MAC bytes, upper
# hex>` (vendor §5.2), with udhcpd handing out addresses. Identity from device.conf.
#
# rehost: udhcpc reads `-x hostname:` once, at its start, and a renew (SIGUSR1, as `reconnect` sends)
# keeps it, so a new did needs a new udhcpc. At its start BusyBox udhcpc runs its script with
# `deconfig`, which on most boards (BusyBox's simple.script) flushes the interface's address, and
# with it the routes, until the server's ACK (`bound`) sets them again. A server asked (`-r`) for the
# address its client holds gives that one back, usually within a second, and TCP connections on it
# outlive such a gap; still, nothing should start a connection inside it. Hence the order: the
# identity, the hostname the running udhcpc was given (udhcpc.host in MIIO_RUN_DIR) and the current
# address are read first, and any failure there leaves the old udhcpc alone; then the old one is
# stopped with SIGTERM (no -R: no DHCPRELEASE, the address stays until the new one's deconfig) and
# the new one started with -b, so a udhcpc is left running (in the background, trying on) even when
# no server answers (-b exists in BusyBox built for a CPU with an MMU, as all our targets are). It
# returns after about 7 s at worst (1 s for the old one to go; -t 3 -T 1: three discovers, then
# three requests, 1 s apart), below the daemon's 10 s helper timeout. The helper runs it before it
# answers `res_didkeymac2` "ok", so the daemon's new cloud session and mDNS announcement come after
# the gap (L§16).
#
# POSIX sh (BusyBox ash, dash). Nothing read from a file goes through eval or an unquoted expansion.
#
# Environment (all optional):
#   MIIO_DATADIR     data dir (default /etc/miio/)
#   MIIO_IFACE       Wi-Fi interface (default wlan0)
#   MIIO_RUN_DIR     generated configs, pid and lease files (default /var/run/miio)
#   MIIO_WPA_DRIVER  wpa_supplicant -D driver (default: wpa_supplicant's own)
#   MIIO_WPA_CTRL    wpa_supplicant control dir (default /var/run/wpa_supplicant)
#   MIIO_ASSOC_WAIT  seconds to wait for the association (default 10)
#   MIIO_AP_IP       the device's address in AP mode, a /24 (default 192.168.13.1)
#   MIIO_AP_CHANNEL  AP channel (default 6)
#   MIIO_WIFI_MODULE kernel module reloaded by `reload` (default none)
#   MIIO_WPA_SUPPLICANT, MIIO_WPA_CLI, MIIO_HOSTAPD, MIIO_UDHCPC, MIIO_UDHCPD, MIIO_IFCONFIG,
#   MIIO_MODPROBE, MIIO_RMMOD   the commands (default: their names, found on PATH)

LC_ALL=C
export LC_ALL

DATADIR=${MIIO_DATADIR:-/etc/miio/}
case $DATADIR in
*/) ;;
*) DATADIR=$DATADIR/ ;;
esac
IFACE=${MIIO_IFACE:-wlan0}
RUN_DIR=${MIIO_RUN_DIR:-/var/run/miio}
WPA_DRIVER=${MIIO_WPA_DRIVER:-}
WPA_CTRL=${MIIO_WPA_CTRL:-/var/run/wpa_supplicant}
ASSOC_WAIT=${MIIO_ASSOC_WAIT:-10}
AP_IP=${MIIO_AP_IP:-192.168.13.1}
AP_CHANNEL=${MIIO_AP_CHANNEL:-6}
WIFI_MODULE=${MIIO_WIFI_MODULE:-}
WPA_SUPPLICANT=${MIIO_WPA_SUPPLICANT:-wpa_supplicant}
WPA_CLI=${MIIO_WPA_CLI:-wpa_cli}
HOSTAPD=${MIIO_HOSTAPD:-hostapd}
UDHCPC=${MIIO_UDHCPC:-udhcpc}
UDHCPD=${MIIO_UDHCPD:-udhcpd}
IFCONFIG=${MIIO_IFCONFIG:-ifconfig}
MODPROBE=${MIIO_MODPROBE:-modprobe}
RMMOD=${MIIO_RMMOD:-rmmod}

TAB=$(printf '\t')
CR=$(printf '\r')

log() {
	printf 'wifi_start.sh: %s\n' "$*" >&2
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

# conf_get FILE KEY: sets v to the value of the last KEY= line (trimmed, CR dropped), as the daemon
# reads these files. Returns 1 when there is none.
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

# unquote S: sets v to S without one pair of double quotes, with \" and \\ undone (L§17).
unquote() {
	case $1 in
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

# dashed S: sets d to S with every . replaced by - (vendor §5.2, §7).
dashed() {
	d='' s=$1
	while :; do
		case $s in
		*.*)
			d=$d${s%%.*}-
			s=${s#*.}
			;;
		*)
			d=$d$s
			break
			;;
		esac
	done
}

hex() {
	printf '%s' "$1" | od -An -v -tx1 | tr -d ' \n'
}

# identity: model, did and mac from device.conf.
identity() {
	f=${DATADIR}device.conf
	conf_get "$f" model
	model=$v
	conf_get "$f" did
	did=$v
	conf_get "$f" mac
	mac=$v
	if [ -z "$model" ]; then
		log "$f: no model"
		return 1
	fi
}

# stop_pid FILE: stops the process named in a pid file of ours.
stop_pid() {
	[ -r "$1" ] || return 0
	pid=
	IFS= read -r pid <"$1" || :
	case $pid in
	'' | *[!0-9]*) ;;
	*) kill "$pid" 2>/dev/null ;;
	esac
	rm -f "$1"
}

stop_all() {
	for p in udhcpc wpa_supplicant udhcpd hostapd; do
		stop_pid "$RUN_DIR/$p.pid"
	done
}

# alive PID: the process runs. A zombie (dead, not yet reaped) answers kill -0 as well; /proc tells.
alive() {
	kill -0 "$1" 2>/dev/null || return 1
	st=
	{ IFS= read -r st <"/proc/$1/stat"; } 2>/dev/null || return 0
	st=${st##*) }
	[ "${st%% *}" != Z ]
}

# udhcpc_pid: sets pid to the pid of the udhcpc of ours that runs; returns 1 when none does (no
# pid file, or a dead pid). The group keeps a missing file quiet (see reconnect).
udhcpc_pid() {
	pid=
	{ IFS= read -r pid <"$RUN_DIR/udhcpc.pid"; } 2>/dev/null || :
	case $pid in
	'' | *[!0-9]*) return 1 ;;
	esac
	alive "$pid"
}

# cur_ip: sets ip to the IPv4 address of IFACE from ifconfig (BusyBox `inet addr:A`, net-tools
# `inet A`), else "".
cur_ip() {
	ip=
	out=$("$IFCONFIG" "$IFACE" 2>/dev/null) || return 0
	while IFS= read -r line; do
		trim "$line"
		case $t in
		"inet addr:"*) ip=${t#inet addr:} ;;
		"inet "*) ip=${t#inet } ;;
		*) continue ;;
		esac
		ip=${ip%%[ "$TAB"]*}
		break
	done <<EOF
$out
EOF
	case $ip in
	*[!0-9.]* | 0.0.0.0) ip= ;;
	esac
}

# wait_assoc: until wpa_supplicant reports COMPLETED, at most ASSOC_WAIT seconds. Without a usable
# wpa_cli the DHCP attempt decides.
wait_assoc() {
	i=0
	while :; do
		st=$("$WPA_CLI" -p "$WPA_CTRL" -i "$IFACE" status 2>/dev/null) || return 0
		case $st in
		*wpa_state=COMPLETED*) return 0 ;;
		esac
		if [ "$i" -ge "$ASSOC_WAIT" ]; then
			log "not associated after ${ASSOC_WAIT}s"
			return 1
		fi
		sleep 1
		i=$((i + 1))
	done
}

# dhcp_host: sets host to the DHCP hostname of the identity (vendor §7), "" without a model.
dhcp_host() {
	host=
	if [ -n "$model" ]; then
		dashed "$model"
		host=${d}_miio$did
	fi
}

# dhcp [ARG...]: starts our udhcpc with the hostname of the identity (noted in udhcpc.host for
# rehost) and ARGs, by default -n -t 4 -T 2: give up after the tries (the helper retries); with a
# lease udhcpc stays to renew it.
dhcp() {
	[ $# -gt 0 ] || set -- -n -t 4 -T 2
	dhcp_host
	if [ -n "$host" ]; then
		set -- "$@" -x "hostname:$host"
	fi
	printf '%s\n' "$host" >"$RUN_DIR/udhcpc.host" || log "cannot write $RUN_DIR/udhcpc.host"
	"$UDHCPC" -i "$IFACE" -p "$RUN_DIR/udhcpc.pid" "$@"
}

start_sta() {
	wc=${DATADIR}wifi.conf
	if ! conf_get "$wc" ssid; then
		log "$wc: no ssid"
		return 1
	fi
	unquote "$v"
	ssid=$v
	psk=
	if conf_get "$wc" psk; then
		unquote "$v"
		psk=$v
	fi
	km=
	if conf_get "$wc" key_mgmt; then
		unquote "$v"
		km=$v
	fi
	if [ -z "$km" ]; then
		if [ -n "$psk" ]; then km=WPA; else km=NONE; fi
	fi
	# Without a model the DHCP hostname is left out; STA still comes up.
	identity || :
	stop_all
	mkdir -p "$RUN_DIR" || return 1
	conf=$RUN_DIR/wpa_supplicant.conf
	sx=$(hex "$ssid")
	(
		umask 077
		{
			printf 'ctrl_interface=%s\n' "$WPA_CTRL"
			printf 'network={\n\tssid=%s\n\tscan_ssid=1\n' "$sx"
			if [ "$km" = NONE ]; then
				printf '\tkey_mgmt=NONE\n'
			else
				case $psk in
				*[!0-9A-Fa-f]*) printf '\tpsk="%s"\n' "$psk" ;;
				*) if [ ${#psk} -eq 64 ]; then
					printf '\tpsk=%s\n' "$psk"
				else
					printf '\tpsk="%s"\n' "$psk"
				fi ;;
				esac
			fi
			printf '}\n'
		} >"$conf"
	) || return 1
	"$IFCONFIG" "$IFACE" up || return 1
	if [ -n "$WPA_DRIVER" ]; then
		set -- -D "$WPA_DRIVER"
	else
		set --
	fi
	if ! "$WPA_SUPPLICANT" -B "$@" -i "$IFACE" -c "$conf" -P "$RUN_DIR/wpa_supplicant.pid"; then
		log "wpa_supplicant failed"
		return 1
	fi
	wait_assoc || return 1
	if ! dhcp; then
		log "no DHCP lease"
		return 1
	fi
}

start_ap() {
	identity || return 1
	dashed "$model"
	# The last two bytes of AA:BB:CC:DD:EE:FF, upper-case, without the colon.
	tail=${mac#*:*:*:*:}
	tail=$(printf '%s' "${tail%%:*}${tail#*:}" | tr a-f A-F)
	ssid=${d}_miap$tail
	stop_all
	mkdir -p "$RUN_DIR" || return 1
	conf=$RUN_DIR/hostapd.conf
	printf '%s\n' "interface=$IFACE" "ssid=$ssid" hw_mode=g "channel=$AP_CHANNEL" auth_algs=1 \
		ignore_broadcast_ssid=0 >"$conf" || return 1
	"$IFCONFIG" "$IFACE" "$AP_IP" netmask 255.255.255.0 up || return 1
	if ! "$HOSTAPD" -B -P "$RUN_DIR/hostapd.pid" "$conf"; then
		log "hostapd failed"
		return 1
	fi
	net=${AP_IP%.*}
	dconf=$RUN_DIR/udhcpd.conf
	printf '%s\n' "interface $IFACE" "start $net.100" "end $net.150" "option subnet 255.255.255.0" \
		"option router $AP_IP" "pidfile $RUN_DIR/udhcpd.pid" "lease_file $RUN_DIR/udhcpd.leases" >"$dconf"
	: >"$RUN_DIR/udhcpd.leases"
	"$UDHCPD" "$dconf" || log "udhcpd failed: phones will get no address"
	log "AP $ssid up"
}

reconnect() {
	if [ -r "$RUN_DIR/wpa_supplicant.pid" ] &&
		"$WPA_CLI" -p "$WPA_CTRL" -i "$IFACE" reassociate >/dev/null 2>&1 &&
		wait_assoc; then
		# A fresh lease on the (maybe new) network.
		pid=
		# No udhcpc pid file is normal (the lease came from elsewhere): quiet. The group is needed
		# because a failed `<file` is reported before a `2>/dev/null` on the same command applies.
		{ IFS= read -r pid <"$RUN_DIR/udhcpc.pid"; } 2>/dev/null || :
		case $pid in
		'' | *[!0-9]*) ;;
		*) kill -USR1 "$pid" 2>/dev/null && return 0 ;;
		esac
		identity || :
		dhcp && return 0
	fi
	start_sta
}

# rehost: see the header. Exit 0 when udhcpc was restarted or nothing was to be done.
rehost() {
	udhcpc_pid || return 0
	old=$pid
	identity || return 1
	dhcp_host
	was=
	{ IFS= read -r was <"$RUN_DIR/udhcpc.host"; } 2>/dev/null || :
	[ "$was" != "$host" ] || return 0
	cur_ip
	kill "$old" 2>/dev/null
	# udhcpc leaves at once on SIGTERM and removes its pid file on the way out, so the new one starts
	# only once it is gone (that removal would take the new one's file); one still there after a
	# second is killed (it would fight the new one for the lease). i counts tenths of a second (a
	# BusyBox without fractional sleep sleeps whole seconds).
	i=0
	while alive "$old"; do
		if [ "$i" -ge 10 ]; then
			kill -9 "$old" 2>/dev/null
			break
		fi
		if sleep 0.1 2>/dev/null; then i=$((i + 1)); else
			sleep 1
			i=$((i + 10))
		fi
	done
	if [ -n "$ip" ]; then
		set -- -b -t 3 -T 1 -r "$ip"
	else
		set -- -b -t 3 -T 1
	fi
	log "DHCP hostname ${host:-(none)}, asking for ${ip:-any address}"
	if ! dhcp "$@"; then
		log "udhcpc failed"
		return 1
	fi
}

reload() {
	stop_all
	if [ -n "$WIFI_MODULE" ]; then
		"$RMMOD" "$WIFI_MODULE" || log "rmmod $WIFI_MODULE failed"
		"$MODPROBE" "$WIFI_MODULE" || log "modprobe $WIFI_MODULE failed"
	fi
	start_sta
}

case ${1:-} in
'')
	if [ -e "${DATADIR}wifi.conf" ]; then start_sta; else start_ap; fi
	;;
sta) start_sta ;;
ap) start_ap ;;
reconnect) reconnect ;;
reload) reload ;;
rehost) rehost ;;
*)
	printf 'Usage: %s [sta|ap|reconnect|reload|rehost]\n' "$0" >&2
	exit 2
	;;
esac
