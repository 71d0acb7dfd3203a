//! The headers a proxy owes both sides: hop-by-hop headers stripped (they describe one
//! connection, not the message), `X-Forwarded-*` and `Forwarded` telling the upstream
//! who the client is, and `Via`.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Uri, Version};

use super::h1::RequestStart;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// RFC 9110 §7.6.1's hop-by-hop headers, plus the non-standard ones still seen, and
/// `HTTP2-Settings`, which belongs to an h2c upgrade of one connection (RFC 7540
/// §3.2.1) and is never passed on.
fn hop_by_hop() -> [&'static HeaderName; 9] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &HTTP2_SETTINGS,
    ]
}

/// The `Upgrade` the request may pass on: of the protocols it asks to switch to
/// (`Connection: upgrade` + `Upgrade`), those `allowed` names (by name, any version,
/// case-insensitive), never h2c; `None` when that leaves none.
pub(crate) fn allowed_upgrade(headers: &HeaderMap, allowed: &[String]) -> Option<HeaderValue> {
    if allowed.is_empty()
        || !headers.contains_key(header::UPGRADE)
        || !connection_lists(headers, "upgrade")
    {
        return None;
    }
    let kept: Vec<&str> = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|protocol| {
            let name = protocol.split('/').next().unwrap_or(protocol);
            !name.eq_ignore_ascii_case("h2c")
                && allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
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
/// `Host`. With `upgrade`, the message is that upgrade: `Upgrade` is set to it, with
/// `Connection: upgrade`.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
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
    match upgrade {
        Some(protocols) => {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocols);
        }
        None => {
            headers.remove(header::UPGRADE);
        }
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

/// The authority the client asked for as a header value ([`ClientSide::host`]): one
/// made from its URI's (HTTP/2, absolute form), else its `Host` header's own (a clone
/// shares its bytes).
pub(crate) fn client_authority(uri: &Uri, fields: &HeaderMap) -> Option<HeaderValue> {
    match uri.authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => fields
            .get(header::HOST)
            .filter(|host| host.to_str().is_ok())
            .cloned(),
    }
}

/// A field this proxy sets on a request going up, in place of any the client sent under
/// that name; `None`: the client's is dropped and none is sent.
pub(crate) type SetField = (&'static HeaderName, Option<HeaderValue>);

/// What every attempt of a request sends before the fields the attempt sets itself.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// For HTTP/1.1 groups but upgrades: the request line and fields, the request's own
    /// [`SetField`]s included, written once ([`RequestStart`]).
    Written(RequestStart),
    /// For HTTP/2 groups and upgrades, which go through hyper's client.
    Parsed(ParsedHead),
}

/// The client's request head as hyper parsed it, hop-by-hop fields stripped and the
/// path rewritten as the route says.
#[derive(Debug)]
pub(crate) struct ParsedHead {
    pub(crate) method: Method,
    /// The path and query sent up.
    pub(crate) path: PathAndQuery,
    pub(crate) fields: HeaderMap,
}

impl ParsedHead {
    /// An attempt's head as a request for hyper, of `version`, to the `uri` made from
    /// the path sent up: the client's fields less those in `set`, then `set`'s, then
    /// `via`.
    pub(crate) fn request<B>(
        &self,
        set: &[SetField],
        via: &'static HeaderValue,
        body: B,
        uri: impl FnOnce(&PathAndQuery) -> Uri,
        version: Version,
    ) -> Request<B> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri(&self.path);
        *req.version_mut() = version;
        let headers = req.headers_mut();
        headers.reserve(self.fields.len() + set.len() + 1);
        let kept = self
            .fields
            .iter()
            .filter(|(name, _)| !set.iter().any(|(replaced, _)| replaced == name));
        for (name, value) in kept.chain(own_fields(set, via)) {
            headers.append(name.clone(), value.clone());
        }
        req
    }
}

impl Outgoing {
    /// A request of `method` to `path` with no fields, for the HTTP/1.1 codec.
    #[cfg(test)]
    pub(crate) fn bare(method: &Method, path: &str) -> Self {
        Self::Written(RequestStart::new(method, path, std::iter::empty()))
    }

    /// This request's head with nothing set on it but `Via`.
    #[cfg(test)]
    pub(crate) fn head(&self) -> RequestHead<'_> {
        RequestHead {
            outgoing: self,
            set: &[],
            via: via(Version::HTTP_11),
        }
    }
}

/// The head of one attempt as it goes up: the request's [`Outgoing`] part (less, when
/// parsed, the fields this proxy sets), then this proxy's fields, then its `Via` entry.
/// Kept in parts rather than merged into one map: every attempt sends the same parts
/// without a copy, and the HTTP/1.1 codec writes them straight into its buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestHead<'a> {
    pub(crate) outgoing: &'a Outgoing,
    pub(crate) set: &'a [SetField],
    pub(crate) via: &'static HeaderValue,
}

/// The fields this proxy sets, `set`'s then `via`.
pub(crate) fn own_fields<'a>(
    set: &'a [SetField],
    via: &'static HeaderValue,
) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> {
    sent(set).chain(std::iter::once((&header::VIA, via)))
}

/// The fields of `set` that are sent: those with a value.
pub(crate) fn sent(set: &[SetField]) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    set.iter()
        .filter_map(|(name, value)| Some((*name, value.as_ref()?)))
}

/// Adds to `set` the `X-Forwarded-For/Proto/Host/Port` and `Forwarded` (ours when
/// asked) to send in place of the client's `headers`. Of an incoming `X-Forwarded-For`,
/// only the `trusted_hops` rightmost entries survive — those the trusted proxies in front
/// (an ALB: 1) appended; anything left of them is whatever the client chose to send. The
/// other `X-Forwarded-*` are believed only with a trusted hop.
pub(crate) fn forwarding(
    headers: &HeaderMap,
    client: &ClientSide,
    trusted_hops: u32,
    forwarded: bool,
    set: &mut Vec<SetField>,
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
    set.push((&X_FORWARDED_FOR, built(xff)));

    let proto = if client.tls { "https" } else { "http" };
    let from_trusted =
        |name: &HeaderName| (trusted > 0).then(|| headers.get(name).cloned()).flatten();
    let proto_value = from_trusted(&X_FORWARDED_PROTO).unwrap_or(HeaderValue::from_static(proto));
    set.push((&X_FORWARDED_PROTO, Some(proto_value)));
    let host = from_trusted(&X_FORWARDED_HOST).or_else(|| client.host.clone());
    set.push((&X_FORWARDED_HOST, host));
    let port =
        from_trusted(&X_FORWARDED_PORT).unwrap_or_else(|| HeaderValue::from(client.local_port));
    set.push((&X_FORWARDED_PORT, Some(port)));

    let value = if forwarded {
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
        Some(match trusted_forwarded(headers, trusted) {
            Some(before) => format!("{before}, {element}"),
            None => element,
        })
    } else {
        // Passed on as the trusted proxies wrote it, without what a client put left of
        // their elements: it could claim any address there.
        trusted_forwarded(headers, trusted)
    };
    set.push((&FORWARDED, value.and_then(built)));
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

/// This proxy's `Via` entry for a message received in `version` (`1.1 tiergate`, or
/// `2 tiergate` for HTTP/2).
pub(crate) fn via(version: Version) -> &'static HeaderValue {
    static VIA_2: HeaderValue = HeaderValue::from_static("2 tiergate");
    static VIA_10: HeaderValue = HeaderValue::from_static("1.0 tiergate");
    static VIA_11: HeaderValue = HeaderValue::from_static("1.1 tiergate");
    if version == Version::HTTP_2 {
        &VIA_2
    } else if version == Version::HTTP_10 {
        &VIA_10
    } else {
        &VIA_11
    }
}

/// Appends this proxy to `Via`.
pub(crate) fn append_via(headers: &mut HeaderMap, version: Version) {
    headers.append(header::VIA, via(version).clone());
}

/// A value from a string we built; one that is not a valid header value (it cannot be,
/// from the parts above) is dropped rather than sent malformed.
fn built(value: String) -> Option<HeaderValue> {
    HeaderValue::try_from(value).ok()
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

    /// The client's `headers` as they go up with the forwarding fields.
    fn set_forwarding(headers: &mut HeaderMap, client: &ClientSide, trusted_hops: u32, ours: bool) {
        let mut set = Vec::new();
        forwarding(headers, client, trusted_hops, ours, &mut set);
        let parsed = ParsedHead {
            method: Method::GET,
            path: PathAndQuery::from_static("/"),
            fields: std::mem::take(headers),
        };
        let uri = |path: &PathAndQuery| Uri::from(path.clone());
        let sent = parsed.request(&set, via(Version::HTTP_11), (), uri, Version::HTTP_11);
        *headers = sent.into_parts().0.headers;
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
        strip_hop_by_hop(&mut h, None);
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
        strip_hop_by_hop(&mut h, None);
        assert_eq!(h, headers(&pairs));
        // A lone `Upgrade` (no `Connection`) is still removed.
        let mut h = headers(&[("upgrade", "websocket"), ("x-kept", "yes")]);
        strip_hop_by_hop(&mut h, None);
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
        let upgrade = allowed_upgrade(&h, &["websocket".to_owned()]);
        assert_eq!(
            upgrade.as_ref().map(HeaderValue::as_bytes),
            Some(&b"websocket"[..])
        );
        strip_hop_by_hop(&mut h, upgrade);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    /// Mutation: drop the h2c test in `allowed_upgrade`, and a route that (wrongly)
    /// allows h2c passes it on.
    #[test]
    fn only_the_allowed_upgrades_pass_and_never_h2c() {
        let allowed = |list: &[&str]| list.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
        let asks = |protocols: &str| {
            headers(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", protocols),
                ("http2-settings", "AAMAAABkAAQAAP__"),
            ])
        };
        let passed = |h: &HeaderMap, list: &[&str]| {
            allowed_upgrade(h, &allowed(list)).map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(passed(&asks("h2c"), &["websocket"]), None);
        assert_eq!(
            passed(&asks("h2c"), &["websocket", "h2c"]),
            None,
            "never h2c"
        );
        assert_eq!(
            passed(&asks("WebSocket"), &["websocket"]).as_deref(),
            Some("WebSocket")
        );
        assert_eq!(
            passed(&asks("h2c, websocket/13"), &["websocket"]).as_deref(),
            Some("websocket/13")
        );
        assert_eq!(passed(&asks("websocket"), &[]), None);
        let no_connection = headers(&[("upgrade", "websocket")]);
        assert_eq!(passed(&no_connection, &["websocket"]), None);
        let mut h = asks("h2c");
        strip_hop_by_hop(&mut h, None);
        assert!(h.is_empty(), "{h:?}");
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
