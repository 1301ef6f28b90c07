//! What a benchmark sends: the target parsed from its URL, and the request — method, headers,
//! body — built once as bytes, the way ab and curl would put them on the wire.

use std::net::{SocketAddr, ToSocketAddrs};

use serde::{Deserialize, Serialize};

/// Where to send requests, parsed from an `http://host:port/path` URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The resolved address.
    pub addr: SocketAddr,
    /// The host as written (for the `Host` header and the report).
    pub host: String,
    /// The port.
    pub port: u16,
    /// The path, query included, as sent on the request line.
    pub path: String,
    /// An `Authorization` header value from credentials in the URL (never printed).
    #[serde(skip)]
    pub authorization: Option<String>,
}

impl Target {
    /// Parses an `http://` URL (the scheme in any case, as RFC 3986 allows); the port defaults
    /// to 80 and the path to `/`. Credentials in the URL (`http://user:pw@host/`) become a
    /// Basic `Authorization` header, as curl sends them; characters a request line cannot carry
    /// raw (a space, say) are percent-encoded, as curl and browsers do.
    pub fn parse(url: &str) -> Result<Target, String> {
        let scheme_end = url.find("://");
        let rest = match scheme_end.map(|i| (&url[..i], &url[i + 3..])) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(format!("'{url}': https is not supported; use http://"));
            }
            _ => {
                return Err(format!(
                    "'{url}' is not a URL; expected http://HOST:PORT/PATH"
                ));
            }
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let (userinfo, authority) = match authority.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, authority),
        };
        if authority.is_empty() {
            return Err(format!("'{url}' has no host"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("'{url}': bad port '{p}'"))?;
                (h.to_string(), port)
            }
            _ => (authority.to_string(), 80),
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addr = (bare, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve '{host}': {e}"))?
            .next()
            .ok_or_else(|| format!("cannot resolve '{host}'"))?;
        let authorization = userinfo.map(|u| {
            use base64::Engine;
            let decoded = percent_decode(u);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(decoded)
            )
        });
        Ok(Target {
            addr,
            host,
            port,
            path: percent_encode_path(&path),
            authorization,
        })
    }

    /// The target for an address, path `/`.
    pub fn from_addr(addr: SocketAddr) -> Target {
        Target {
            addr,
            host: addr.ip().to_string(),
            port: addr.port(),
            path: "/".to_string(),
            authorization: None,
        }
    }

    /// `http://host:port/path`.
    pub fn url(&self) -> String {
        format!("http://{}:{}{}", self.host, self.port, self.path)
    }

    /// The request's bytes: `spec`'s method, headers and body for this target's path, HTTP/1.0
    /// as ab sends it, `Connection: Keep-Alive` when connections are reused.
    pub fn request(&self, spec: &RequestSpec, keep_alive: bool) -> Vec<u8> {
        let given = |name: &str| {
            spec.headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(name))
        };
        let mut r = format!("{} {} HTTP/1.0\r\n", spec.method, self.path);
        // A header given with -H replaces the default of the same name, as in ab.
        if !given("host") {
            r.push_str(&format!("Host: {}:{}\r\n", self.host, self.port));
        }
        if !given("user-agent") {
            r.push_str(&format!(
                "User-Agent: ringlab/{}\r\n",
                env!("CARGO_PKG_VERSION")
            ));
        }
        if !given("accept") {
            r.push_str("Accept: */*\r\n");
        }
        if let Some(auth) = self
            .authorization
            .as_ref()
            .filter(|_| !given("authorization"))
        {
            r.push_str(&format!("Authorization: {auth}\r\n"));
        }
        for (name, value) in &spec.headers {
            r.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = &spec.body {
            r.push_str(&format!("Content-Length: {}\r\n", body.len()));
            if !given("content-type") {
                r.push_str(&format!("Content-Type: {}\r\n", spec.content_type));
            }
        }
        if keep_alive && !given("connection") {
            r.push_str("Connection: Keep-Alive\r\n");
        }
        r.push_str("\r\n");
        let mut bytes = r.into_bytes();
        if let Some(body) = &spec.body {
            bytes.extend_from_slice(body);
        }
        bytes
    }
}

/// What to send besides the target: ab's `-m`, `-i`, `-H`, `-p` and `-T`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestSpec {
    /// The method (`GET`; `HEAD` with `-i`; `POST` with a body unless `-m` says otherwise).
    pub method: String,
    /// Extra header fields, in order; one named like a default (`Host`, `User-Agent`, `Accept`)
    /// replaces it.
    pub headers: Vec<(String, String)>,
    /// A request body (`-p FILE`), sent with its `Content-Length`.
    #[serde(skip)]
    pub body: Option<Vec<u8>>,
    /// The body's `Content-Type` (`-T`), unless a `-H Content-Type:` is given.
    pub content_type: String,
}

impl Default for RequestSpec {
    fn default() -> RequestSpec {
        RequestSpec {
            method: "GET".into(),
            headers: Vec::new(),
            body: None,
            content_type: "text/plain".into(),
        }
    }
}

impl RequestSpec {
    /// Whether responses carry no body (`HEAD`), so none is read.
    pub fn head_only(&self) -> bool {
        self.method.eq_ignore_ascii_case("HEAD")
    }

    /// Checks a method token (RFC 9110's `token`: no spaces or separators).
    pub fn check_method(method: &str) -> Result<(), String> {
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if method.is_empty() || !method.bytes().all(tchar) {
            return Err(format!(
                "'{method}' is not an HTTP method; use a token such as GET, POST or PURGE"
            ));
        }
        Ok(())
    }

    /// Parses `-H 'Name: value'`, refusing what would break the request's framing.
    pub fn parse_header(line: &str) -> Result<(String, String), String> {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header '{line}' has no ':'; write it as 'Name: value'"))?;
        let name = name.trim();
        let value = value.trim();
        if Self::check_method(name).is_err() {
            return Err(format!(
                "header '{line}': '{name}' is not a field name (letters, digits and !#$%&'*+-.^_`|~)"
            ));
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(format!(
                "header '{line}': a value cannot hold CR, LF or NUL"
            ));
        }
        if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            return Err(format!(
                "header '{line}': the body's framing is set by -p; do not give {name}"
            ));
        }
        Ok((name.to_string(), value.to_string()))
    }
}

/// Percent-encodes the bytes a request target cannot carry raw (controls, space, non-ASCII and
/// the few printable characters RFC 3986 excludes); an existing `%XX` is kept as it is.
fn percent_encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        let raw = b.is_ascii_graphic()
            && !matches!(
                b,
                b'"' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}'
            );
        if raw {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (credentials in a URL may carry them); malformed escapes stay as
/// written.
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}
