//! The local network facts for INFO's `netif` (PROTOCOL.md §5.4): the address of the cloud socket,
//! its interface netmask, and the default gateway from /proc/net/route (or "" when there is none).

use std::net::Ipv4Addr;

use crate::proto::node::Netif;

/// The default gateway in a /proc/net/route text: the row whose destination and mask are 0.
/// The kernel prints each address as `%08X` of the in-memory u32, whose bytes are in network order:
/// the value is native-endian, so its native bytes are the address on any board.
pub fn default_gateway(route: &str) -> Option<Ipv4Addr> {
    route.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
            return None;
        }
        let g = u32::from_str_radix(f[2], 16).ok()?;
        (g != 0).then(|| Ipv4Addr::from(g.to_ne_bytes()))
    })
}

pub fn netif_for(local: Ipv4Addr) -> Netif {
    let mask = super::sys::netmask_of(local)
        .map(|m| m.to_string())
        .unwrap_or_default();
    let mut route = String::new();
    let gw = super::sys::open("/proc/net/route".as_ref(), libc::O_RDONLY, 0)
        .and_then(|mut f| std::io::Read::read_to_string(&mut f, &mut route))
        .ok()
        .map(|_| route.as_str())
        .and_then(default_gateway)
        .map(|g| g.to_string())
        .unwrap_or_default();
    Netif {
        ip: local.to_string(),
        mask,
        gw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route line as this machine's kernel would print it: `%08X` of the address's bytes read
    /// as a native u32.
    fn hex(ip: [u8; 4]) -> String {
        format!("{:08X}", u32::from_ne_bytes(ip))
    }

    #[test]
    fn gateway_is_read_in_native_byte_order() {
        // An address whose bytes all differ: any fixed byte order is wrong on one endianness.
        let t = format!(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             eth0\t00000000\t{}\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
            hex([10, 20, 30, 254])
        );
        assert_eq!(default_gateway(&t), Some(Ipv4Addr::new(10, 20, 30, 254)));
        #[cfg(target_endian = "little")]
        assert_eq!(hex([192, 168, 1, 1]), "0101A8C0");
        #[cfg(target_endian = "big")]
        assert_eq!(hex([192, 168, 1, 1]), "C0A80101");
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn gateway_from_route_table() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_gateway(t), Some(Ipv4Addr::new(192, 168, 1, 1)));
        assert_eq!(default_gateway("Iface\n"), None);
        assert_eq!(default_gateway("garbage\nx y z"), None);
    }
}
