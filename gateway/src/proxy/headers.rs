//! The headers a proxy owes both sides: hop-by-hop headers stripped (they describe one
//! connection, not the message), `X-Forwarded-*` and `Forwarded` telling the upstream
//! who the client is, and `Via`.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// RFC 9110 §7.6.1's hop-by-hop headers, plus the non-standard ones still seen.
fn hop_by_hop() -> [&'static HeaderName; 8] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
    ]
}

/// Whether the request asks to switch protocols (`Connection: upgrade` + `Upgrade`).
pub(crate) fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_lists(headers, "upgrade")
}

fn connection_lists(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes the hop-by-hop headers and those the `Connection` header names, except
/// `Host`. With
/// `upgrade`, `Upgrade` and `Connection: upgrade` are kept: they are the message.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of them: one pass comparing names (an integer compare for
    // the standard ones) spares the hashed removal of each of the nine, which was ~5 %
    // of a proxied request's instructions. `Connection` is hop-by-hop, so an upgrade
    // never takes this exit.
    let any = headers
        .keys()
        .any(|name| name == header::UPGRADE || hop_by_hop().contains(&name));
    if !any {
        return;
    }
    // Names listed in `Connection` first, while it is still there.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && name == header::UPGRADE))
        // `Connection: Host` must not make the upstream see another Host than the client
        // sent (RFC 9110 §7.6.1 lists no end-to-end field a client may remove so).
        .filter(|name| name != header::HOST)
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in hop_by_hop() {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// What the proxy knows of the client's connection.
#[derive(Debug, Clone)]
pub(crate) struct ClientSide {
    pub(crate) peer: SocketAddr,
    pub(crate) tls: bool,
    pub(crate) local_port: u16,
    /// The authority the client asked for (`Host` or the URI's), port included: the
    /// `Host` header's own value, so passing it on copies nothing.
    pub(crate) host: Option<HeaderValue>,
}

/// Sets `X-Forwarded-For/Proto/Host/Port` (and `Forwarded` when asked). Of an incoming
/// `X-Forwarded-For`, only the `trusted_hops` rightmost entries survive — those the
/// trusted proxies in front (an ALB: 1) appended; anything left of them is whatever the
/// client chose to send. The other `X-Forwarded-*` are believed only with a trusted hop.
pub(crate) fn set_forwarding(
    headers: &mut HeaderMap,
    client: &ClientSide,
    trusted_hops: u32,
    forwarded: bool,
) {
    let trusted = usize::try_from(trusted_hops).unwrap_or(usize::MAX);
    let peer_ip = client.peer.ip();
    let mut xff = String::with_capacity(48);
    if trusted > 0 {
        let incoming: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        for entry in &incoming[incoming.len().saturating_sub(trusted)..] {
            xff.push_str(entry);
            xff.push_str(", ");
        }
    }
    push_ip(&mut xff, peer_ip);
    set(headers, &X_FORWARDED_FOR, xff);

    let proto = if client.tls { "https" } else { "http" };
    let from_trusted = |headers: &HeaderMap, name: &HeaderName| {
        (trusted > 0).then(|| headers.get(name).cloned()).flatten()
    };
    let proto_value =
        from_trusted(headers, &X_FORWARDED_PROTO).unwrap_or(HeaderValue::from_static(proto));
    headers.insert(X_FORWARDED_PROTO.clone(), proto_value);
    match (from_trusted(headers, &X_FORWARDED_HOST), &client.host) {
        (Some(v), _) => {
            headers.insert(X_FORWARDED_HOST.clone(), v);
        }
        (None, Some(host)) => {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        (None, None) => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    match from_trusted(headers, &X_FORWARDED_PORT) {
        Some(v) => {
            headers.insert(X_FORWARDED_PORT.clone(), v);
        }
        None => {
            headers.insert(
                X_FORWARDED_PORT.clone(),
                HeaderValue::from(client.local_port),
            );
        }
    }

    if forwarded {
        let node = match peer_ip {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("\"[{ip}]\""),
        };
        let mut element = format!("for={node};proto={proto}");
        if let Some(host) = client
            .host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .filter(|h| h.bytes().all(|b| b.is_ascii_graphic() && b != b'"'))
        {
            element.push_str(&format!(";host=\"{host}\""));
        }
        let value = match trusted_forwarded(headers, trusted) {
            Some(before) => format!("{before}, {element}"),
            None => element,
        };
        set(headers, &FORWARDED, value);
    } else {
        // Passed on as the trusted proxies wrote it, without what a client put left of
        // their elements: it could claim any address there.
        match trusted_forwarded(headers, trusted) {
            Some(value) => set(headers, &FORWARDED, value),
            None => {
                headers.remove(&FORWARDED);
            }
        }
    }
}

/// Appends `ip` as text. IPv4, the common case, goes digit by digit (itoa): `Display`
/// through `fmt` cost ~950 instructions a request, as much as the rest of this function.
fn push_ip(out: &mut String, ip: IpAddr) {
    use std::fmt::Write as _;

    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(digits.format(octet));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// The `trusted` rightmost elements of the incoming `Forwarded` (RFC 7239: one element
/// per proxy, comma-separated, each proxy appending its own), joined as one value.
fn trusted_forwarded(headers: &HeaderMap, trusted: usize) -> Option<String> {
    if trusted == 0 {
        return None;
    }
    let mut elements: Vec<&str> = Vec::new();
    for value in headers.get_all(&FORWARDED) {
        // A value that is not text cannot be split safely: none of it is believed.
        let value = value.to_str().ok()?;
        elements.extend(split_elements(value));
    }
    let kept = &elements[elements.len().saturating_sub(trusted)..];
    (!kept.is_empty()).then(|| kept.join(", "))
}

/// Splits a `Forwarded` value into its elements at the commas outside quoted strings
/// (a quoted value may hold a comma), dropping empty ones.
fn split_elements(value: &str) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let mut escaped = false;
    let mut start = 0;
    let mut cuts = Vec::new();
    for (i, b) in value.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                cuts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    cuts.push(&value[start..]);
    cuts.into_iter().map(str::trim).filter(|e| !e.is_empty())
}

/// Appends this proxy to `Via` (`1.1 tiergate`, or `2 tiergate` for HTTP/2).
pub(crate) fn append_via(headers: &mut HeaderMap, version: http::Version) {
    let hop = if version == http::Version::HTTP_2 {
        HeaderValue::from_static("2 tiergate")
    } else if version == http::Version::HTTP_10 {
        HeaderValue::from_static("1.0 tiergate")
    } else {
        HeaderValue::from_static("1.1 tiergate")
    };
    headers.append(header::VIA, hop);
}

/// Sets a header from a string we built; a value that is not a valid header (it cannot
/// be, from the parts above) removes it rather than sending something malformed.
fn set(headers: &mut HeaderMap, name: &HeaderName, value: String) {
    match HeaderValue::try_from(value) {
        Ok(v) => {
            headers.insert(name.clone(), v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(host: Option<&HeaderValue>) -> ClientSide {
        ClientSide {
            peer: "10.1.2.3:5555".parse().unwrap(),
            tls: true,
            local_port: 8443,
            host: host.cloned(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_as_it_is() {
        let pairs = [
            ("host", "a"),
            ("x-one", "1"),
            ("accept", "*/*"),
            ("x-one", "2"),
        ];
        let mut h = headers(&pairs);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, headers(&pairs));
        // A lone `Upgrade` (no `Connection`) is still removed.
        let mut h = headers(&[("upgrade", "websocket"), ("x-kept", "yes")]);
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn client_addresses_are_written_as_text() {
        for ip in [
            "0.0.0.0",
            "10.1.2.3",
            "192.168.100.255",
            "::1",
            "2001:db8::7",
        ] {
            let mut out = String::new();
            push_ip(&mut out, ip.parse().unwrap());
            assert_eq!(out, ip);
        }
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_connection_upgrade() {
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn untrusted_forwarding_headers_are_replaced() {
        let mut h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "gopher"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        let host = HeaderValue::from_static("api.example.com");
        set_forwarding(&mut h, &client(Some(&host)), 0, false);
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["x-forwarded-port"], "8443");
        assert!(!h.contains_key("forwarded"));
    }

    #[test]
    fn trusted_hops_keep_that_many_entries_from_the_right() {
        let mut h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "https"),
        ]);
        set_forwarding(&mut h, &client(None), 1, true);
        assert_eq!(h["x-forwarded-for"], "2.2.2.2, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["forwarded"], "for=10.1.2.3;proto=https");
        let mut h = headers(&[("x-forwarded-for", "6.6.6.6, 1.1.1.1, 2.2.2.2")]);
        set_forwarding(&mut h, &client(None), 2, false);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.1.2.3");
    }

    #[test]
    fn only_the_trusted_hops_of_forwarded_pass_whether_or_not_we_add_ours() {
        // The client wrote the first element (with a quoted comma to confuse a naive
        // split); the trusted proxy in front appended the second, in a header of its own.
        let incoming = [
            ("forwarded", r#"for=6.6.6.6;host="a,b", for=7.7.7.7"#),
            ("forwarded", "for=1.1.1.1;proto=https"),
        ];
        let mut h = headers(&incoming);
        set_forwarding(&mut h, &client(None), 1, false);
        assert_eq!(h["forwarded"], "for=1.1.1.1;proto=https");
        let mut h = headers(&incoming);
        set_forwarding(&mut h, &client(None), 1, true);
        assert_eq!(
            h["forwarded"],
            "for=1.1.1.1;proto=https, for=10.1.2.3;proto=https"
        );
        let mut h = headers(&incoming);
        set_forwarding(&mut h, &client(None), 2, false);
        assert_eq!(h["forwarded"], "for=7.7.7.7, for=1.1.1.1;proto=https");
        let mut h = headers(&incoming);
        set_forwarding(&mut h, &client(None), 3, false);
        assert_eq!(
            h["forwarded"],
            r#"for=6.6.6.6;host="a,b", for=7.7.7.7, for=1.1.1.1;proto=https"#
        );
    }
}
