//! The allow-list of worker addresses that may join through etcd (`--worker-allow`): CIDR
//! networks, single addresses and host names, matched against a registered worker's URL.
//! Pure: no I/O.

/// One entry of the worker allow-list: a network (CIDR), one address, or a host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerAllow {
    /// Addresses in `addr/prefix`.
    Network(std::net::IpAddr, u8),
    /// Exactly this host name (case-insensitive).
    Host(String),
}

impl std::str::FromStr for WorkerAllow {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some((ip, bits)) = s.split_once('/') {
            let ip: std::net::IpAddr = ip.parse().map_err(|_| format!("bad network `{s}`"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits: u8 = bits
                .parse()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("bad prefix length in `{s}`"))?;
            return Ok(Self::Network(ip, bits));
        }
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(Self::Network(ip, if ip.is_ipv4() { 32 } else { 128 }));
        }
        if s.is_empty() || s.contains(['/', ':', ' ', '@']) {
            return Err(format!(
                "`{s}` is neither a network, an address nor a host name"
            ));
        }
        Ok(Self::Host(s.to_ascii_lowercase()))
    }
}

impl WorkerAllow {
    /// Whether the worker at `url` may join under `list` (an empty list allows every URL).
    pub fn permits(list: &[Self], url: &str) -> bool {
        if list.is_empty() {
            return true;
        }
        let Some(host) = url_host(url) else {
            return false;
        };
        let ip = host.parse::<std::net::IpAddr>().ok();
        list.iter().any(|a| match (a, ip) {
            (Self::Network(net, bits), Some(ip)) => in_network(ip, *net, *bits),
            (Self::Host(name), None) => host.eq_ignore_ascii_case(name),
            _ => false,
        })
    }
}

/// The host of `scheme://host[:port]/...` (brackets of an IPv6 address removed).
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.contains('@') {
        return None;
    }
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split_once(']').map(|(h, _)| h.to_string());
    }
    Some(
        authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .to_string(),
    )
}

fn in_network(ip: std::net::IpAddr, net: std::net::IpAddr, bits: u8) -> bool {
    use std::net::IpAddr;
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_allow_list_matches_networks_addresses_and_names() {
        let list: Vec<WorkerAllow> = ["10.0.0.0/8", "192.168.1.7", "worker-3.internal", "fd00::/8"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(WorkerAllow::permits(&list, "http://10.2.3.4:8080"));
        assert!(WorkerAllow::permits(&list, "http://192.168.1.7:80/x"));
        assert!(!WorkerAllow::permits(&list, "http://192.168.1.8:80"));
        assert!(WorkerAllow::permits(&list, "http://Worker-3.internal:9000"));
        assert!(!WorkerAllow::permits(
            &list,
            "http://worker-3.internal.evil.com:9000"
        ));
        assert!(WorkerAllow::permits(&list, "http://[fd12::1]:8080"));
        assert!(!WorkerAllow::permits(&list, "http://[fe80::1]:8080"));
        assert!(!WorkerAllow::permits(&list, "http://user@10.0.0.1:80"));
        assert!(!WorkerAllow::permits(&list, "http://127.0.0.1:80"));
        assert!(WorkerAllow::permits(&[], "http://anything:1"));
        assert!("10.0.0.0/33".parse::<WorkerAllow>().is_err());
        assert!("a b".parse::<WorkerAllow>().is_err());
    }
}
