//! Source metadata an HBONE CONNECT carries: `forwarded` (RFC 7239) with the source
//! address, `baggage` (W3C) with the source workload, and a W3C `traceparent`.
//!
//! These headers come from the peer, so parsing is bounded and strict; they describe
//! the source for logs and metrics, and never replace the verified TLS identity.

use std::fmt;
use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};

use super::{BAGGAGE, FORWARDED, TRACEPARENT};

/// W3C caps baggage at 8192 bytes and 180 list members.
const MAX_BAGGAGE_LEN: usize = 8192;
const MAX_BAGGAGE_MEMBERS: usize = 180;

/// Why a metadata header was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("header {0} is not visible ASCII")]
    NotAscii(&'static str),
    #[error("forwarded header has no usable for= address: {0:?}")]
    Forwarded(String),
    #[error("baggage is {0} bytes, over the limit of 8192")]
    BaggageTooLong(usize),
    #[error("baggage has over 180 members")]
    BaggageTooManyMembers,
    #[error("baggage member {0:?} is not key=value")]
    BaggageMember(String),
    #[error("traceparent {0:?} is not 00-<32 hex>-<16 hex>-<2 hex>")]
    TraceParent(String),
}

/// Who is sending, as the source ztunnel describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceMetadata {
    pub addr: Option<IpAddr>,
    pub namespace: Option<String>,
    pub workload: Option<String>,
    pub canonical_name: Option<String>,
    pub canonical_revision: Option<String>,
    pub cluster: Option<String>,
}

const KEY_NAMESPACE: &str = "k8s.namespace.name";
const KEY_WORKLOAD: &str = "k8s.workload.name";
const KEY_SERVICE: &str = "service.name";
const KEY_REVISION: &str = "service.version";
const KEY_CLUSTER: &str = "k8s.cluster.name";

impl SourceMetadata {
    /// Adds `forwarded` and `baggage` to a request's headers.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        if let Some(addr) = self.addr {
            let value = match addr {
                IpAddr::V4(v4) => format!("for={v4}"),
                IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(FORWARDED, v);
            }
        }
        let members: Vec<String> = [
            (KEY_NAMESPACE, &self.namespace),
            (KEY_WORKLOAD, &self.workload),
            (KEY_SERVICE, &self.canonical_name),
            (KEY_REVISION, &self.canonical_revision),
            (KEY_CLUSTER, &self.cluster),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", percent_encode(v))))
        .collect();
        if !members.is_empty()
            && let Ok(v) = HeaderValue::from_str(&members.join(","))
        {
            headers.insert(BAGGAGE, v);
        }
    }

    /// Reads `forwarded` and `baggage`; a header that is absent leaves its fields empty.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, MetadataError> {
        let mut meta = Self::default();
        if let Some(v) = headers.get(FORWARDED) {
            let v = v
                .to_str()
                .map_err(|_| MetadataError::NotAscii("forwarded"))?;
            meta.addr = parse_forwarded_for(v)?;
        }
        if let Some(v) = headers.get(BAGGAGE) {
            let v = v.to_str().map_err(|_| MetadataError::NotAscii("baggage"))?;
            for (k, v) in parse_baggage(v)? {
                let slot = match k.as_str() {
                    KEY_NAMESPACE => &mut meta.namespace,
                    KEY_WORKLOAD => &mut meta.workload,
                    KEY_SERVICE => &mut meta.canonical_name,
                    KEY_REVISION => &mut meta.canonical_revision,
                    KEY_CLUSTER => &mut meta.cluster,
                    _ => continue,
                };
                *slot = Some(v);
            }
        }
        Ok(meta)
    }
}

/// The address in the first element's `for=` parameter. `unknown` and obfuscated
/// identifiers (`_hidden`) give `None`.
pub fn parse_forwarded_for(value: &str) -> Result<Option<IpAddr>, MetadataError> {
    let first = value.split(',').next().unwrap_or_default();
    for pair in first.split(';') {
        let Some((k, v)) = pair.trim().split_once('=') else {
            return Err(MetadataError::Forwarded(value.to_string()));
        };
        if !k.trim().eq_ignore_ascii_case("for") {
            continue;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        if v.eq_ignore_ascii_case("unknown") || v.starts_with('_') {
            return Ok(None);
        }
        let ip = match v.strip_prefix('[') {
            Some(rest) => rest.strip_suffix(']').and_then(|s| s.parse().ok()),
            None => v.parse().ok(),
        };
        return ip
            .map(Some)
            .ok_or_else(|| MetadataError::Forwarded(value.to_string()));
    }
    Ok(None)
}

/// W3C baggage as (key, percent-decoded value) pairs; member properties are dropped.
pub fn parse_baggage(value: &str) -> Result<Vec<(String, String)>, MetadataError> {
    if value.len() > MAX_BAGGAGE_LEN {
        return Err(MetadataError::BaggageTooLong(value.len()));
    }
    let mut out = Vec::new();
    for member in value.split(',') {
        let member = member.trim();
        if member.is_empty() {
            continue;
        }
        if out.len() == MAX_BAGGAGE_MEMBERS {
            return Err(MetadataError::BaggageTooManyMembers);
        }
        let kv = member.split(';').next().unwrap_or_default();
        let bad = || MetadataError::BaggageMember(member.to_string());
        let (k, v) = kv.split_once('=').ok_or_else(bad)?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || !k.bytes().all(is_token_byte) {
            return Err(bad());
        }
        out.push((k.to_string(), percent_decode(v).ok_or_else(bad)?));
    }
    Ok(out)
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b',' | b';' | b'"' | b'\\' => return None,
            b if b.is_ascii_graphic() => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// A W3C trace context parent: version 00, trace id, parent span id, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// A new trace, sampled.
    pub fn new_root() -> Self {
        let mut bytes = [0u8; 24];
        fill_random(&mut bytes);
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        trace_id.copy_from_slice(&bytes[..16]);
        span_id.copy_from_slice(&bytes[16..]);
        trace_id[0] |= 1; // never all zero, which W3C forbids
        span_id[0] |= 1;
        Self {
            trace_id,
            span_id,
            flags: 1,
        }
    }

    /// The same trace with a new span: what a hop forwards.
    pub fn child(&self) -> Self {
        let mut span_id = [0u8; 8];
        fill_random(&mut span_id);
        span_id[0] |= 1;
        Self { span_id, ..*self }
    }

    pub fn parse(s: &str) -> Result<Self, MetadataError> {
        let bad = || MetadataError::TraceParent(s.to_string());
        let parts: Vec<&str> = s.trim().split('-').collect();
        let [version, trace, span, flags] = parts.as_slice() else {
            return Err(bad());
        };
        if *version != "00" {
            return Err(bad());
        }
        let trace_id: [u8; 16] = hex_decode(trace).ok_or_else(bad)?;
        let span_id: [u8; 8] = hex_decode(span).ok_or_else(bad)?;
        let [flags]: [u8; 1] = hex_decode(flags).ok_or_else(bad)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return Err(bad());
        }
        Ok(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The child of the request's `traceparent`, or a new root when it has none.
    pub fn propagate(headers: &HeaderMap) -> Self {
        headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Self::parse(v).ok())
            .map(|p| p.child())
            .unwrap_or_else(Self::new_root)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        self.trace_id
            .iter()
            .try_for_each(|b| write!(f, "{b:02x}"))?;
        f.write_str("-")?;
        self.span_id.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        write!(f, "-{:02x}", self.flags)
    }
}

fn hex_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn fill_random(buf: &mut [u8]) {
    // The workspace's one crypto provider supplies randomness too.
    if crate::tls::provider().secure_random.fill(buf).is_err() {
        tracing::error!("secure random source failed; trace ids fall back to the clock");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (nanos >> ((i % 16) * 8)) as u8 | 1;
        }
    }
}

#[cfg(test)]
mod tests;
