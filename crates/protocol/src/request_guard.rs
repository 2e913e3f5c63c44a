//! Which requests a server refuses before reading them, so that a web page cannot drive a
//! server on this machine: a page on any site may send "simple" cross-site POSTs (form or
//! `text/plain` bodies) without asking, and a DNS-rebinding page, whose own name then resolves
//! to 127.0.0.1, can even read the answers of an open loopback server.
//!
//! Two rules close that: a server listening on loopback only answers requests whose `Host` is a
//! loopback name (a rebinding page sends its own), and every POST must carry an
//! `application/json` body (which a browser sends cross-site only after a CORS preflight that
//! lastmile never grants). Every official SDK sends JSON, so neither rule touches real clients.

use std::net::IpAddr;

use crate::error::ApiError;

/// What the guard looks at in one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestHead<'a> {
    /// The HTTP method.
    pub method: &'a str,
    /// The `Host` header, if any.
    pub host: Option<&'a str>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<&'a str>,
}

/// Checks `head` for a server that listens on loopback only (`loopback_only`) or not; the error
/// is the answer to send (403 for a foreign `Host`, 415 for a POST that is not JSON).
pub fn check_request(head: &RequestHead<'_>, loopback_only: bool) -> Result<(), ApiError> {
    check_host(head.host, loopback_only)?;
    if head.method.eq_ignore_ascii_case("POST") && !head.content_type.is_some_and(is_json) {
        return Err(ApiError::unsupported_media_type(head.content_type));
    }
    Ok(())
}

/// The `Host` rule alone (for APIs whose bodies are not JSON, such as sandbox file uploads):
/// on a loopback-only server, a `Host` that does not name this machine gets 403.
pub fn check_host(host: Option<&str>, loopback_only: bool) -> Result<(), ApiError> {
    match host {
        Some(h) if loopback_only && !is_loopback_host(h) => Err(ApiError::forbidden_host(h)),
        _ => Ok(()),
    }
}

/// Whether a `Host` header names this machine: `localhost` (or a name under it), or a loopback
/// address, with or without a port.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // `[::1]` or `[::1]:8080`.
        match rest.split_once(']') {
            Some((ip, _)) => ip,
            None => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a `Content-Type` is JSON (`application/json`, with parameters, or a `+json` type).
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised_and_others_are_not() {
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]",
            "[::1]:8080",
            "api.localhost:8080",
            "localhost.",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "[::2]:80",
            "[::1",
            "0.0.0.0:8080",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn posts_need_json_and_loopback_servers_need_a_loopback_host() {
        let post = |host, content_type| RequestHead {
            method: "POST",
            host,
            content_type,
        };
        let json = Some("application/json; charset=utf-8");
        assert!(check_request(&post(Some("127.0.0.1:80"), json), true).is_ok());
        assert!(check_request(&post(None, json), true).is_ok());
        let e = check_request(&post(Some("rebound.example:80"), json), true).expect_err("host");
        assert_eq!(e.status, 403);
        assert!(check_request(&post(Some("rebound.example:80"), json), false).is_ok());
        for content_type in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ] {
            let e = check_request(&post(Some("localhost"), content_type), false).expect_err("415");
            assert_eq!(e.status, 415);
            assert_eq!(e.error_type, "invalid_request_error");
        }
        let get = RequestHead {
            method: "GET",
            host: Some("localhost"),
            content_type: None,
        };
        assert!(check_request(&get, true).is_ok());
        assert!(is_json("application/vnd.api+json"));
    }
}
