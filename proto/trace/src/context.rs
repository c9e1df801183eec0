//! Trace context on the wire: reading W3C `traceparent`/`tracestate` and B3 (single `b3`
//! header or the `x-b3-*` headers) from a request, and writing them back for the next hop.
//!
//! When a request carries both, W3C wins (as OpenTelemetry's composite propagators do when
//! W3C is first). A header that is present but malformed is reported ([`Extracted::malformed`])
//! so the caller can count it; the request then starts a new trace and is never failed for it.
//! Parsing follows W3C Trace Context level 1 (version `00`; a higher version is read by its
//! first four fields, as the spec asks) and the B3 propagation spec (64- or 128-bit trace ids;
//! a 64-bit id is left-padded with zeros).

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The longest `tracestate` passed on (W3C: 32 members of at most 256 bytes each, rounded).
const MAX_TRACESTATE: usize = 8192;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TraceId(pub [u8; 16]);

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    pub fn random() -> Self {
        loop {
            let id = TraceId(rand::random());
            if id.is_valid() {
                return id;
            }
        }
    }

    pub fn is_valid(&self) -> bool {
        self.0 != [0; 16]
    }
}

impl SpanId {
    pub fn random() -> Self {
        loop {
            let id = SpanId(rand::random());
            if id.is_valid() {
                return id;
            }
        }
    }

    pub fn is_valid(&self) -> bool {
        self.0 != [0; 8]
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

/// Lowercase or uppercase hex of exactly `N` bytes.
fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn parse_trace_id(s: &str) -> Option<TraceId> {
    let id = match s.len() {
        32 => TraceId(parse_hex::<16>(s)?),
        // B3's 64-bit trace ids: the high half is zero.
        16 => {
            let low = parse_hex::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            TraceId(id)
        }
        _ => return None,
    };
    id.is_valid().then_some(id)
}

fn parse_span_id(s: &str) -> Option<SpanId> {
    let id = SpanId(parse_hex::<8>(s)?);
    id.is_valid().then_some(id)
}

/// One span's place in a trace: what a hop passes to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

impl SpanContext {
    /// The `traceparent` value of this span (version `00`).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{}",
            self.trace_id,
            self.span_id,
            if self.sampled { "01" } else { "00" }
        )
    }

    /// The single-header B3 value of this span.
    pub fn b3(&self) -> String {
        format!(
            "{}-{}-{}",
            self.trace_id,
            self.span_id,
            if self.sampled { "1" } else { "0" }
        )
    }
}

/// Which trace header formats a request came with, so the next hop gets the same ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    pub b3_single: bool,
    pub b3_multi: bool,
}

/// What a request's trace headers said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    /// The caller's span, when a header named a valid one.
    pub parent: Option<SpanContext>,
    /// `tracestate`, passed on unchanged with a W3C parent.
    pub tracestate: Option<HeaderValue>,
    /// The name of a trace header that was present but could not be read.
    pub malformed: Option<&'static str>,
    pub formats: Formats,
}

/// Reads the trace context of a request's headers: W3C first, then B3 single, then B3 multi.
pub fn extract(headers: &HeaderMap) -> Extracted {
    let mut out = Extracted {
        formats: Formats {
            b3_single: headers.contains_key(B3),
            b3_multi: headers.contains_key(B3_TRACE_ID),
        },
        ..Extracted::default()
    };
    if let Some(value) = headers.get(TRACEPARENT) {
        match value.to_str().ok().and_then(parse_traceparent) {
            Some(parent) => {
                out.parent = Some(parent);
                out.tracestate = headers
                    .get(TRACESTATE)
                    .filter(|v| v.len() <= MAX_TRACESTATE)
                    .cloned();
                return out;
            }
            None => out.malformed = Some("traceparent"),
        }
    }
    if let Some(value) = headers.get(B3) {
        match value.to_str().ok().map(parse_b3_single) {
            Some(Ok(parent)) => {
                out.parent = parent;
                return out;
            }
            _ => {
                out.malformed.get_or_insert("b3");
            }
        }
    }
    if headers.contains_key(B3_TRACE_ID) {
        match parse_b3_multi(headers) {
            Some(parent) => out.parent = Some(parent),
            None => {
                out.malformed.get_or_insert("x-b3-traceid");
            }
        }
    }
    out
}

/// `version-traceid-parentid-flags`, W3C Trace Context §3.2.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let value = value.trim();
    let mut parts = value.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    let version = parse_hex::<1>(version)?[0];
    // Version ff is invalid; version 00 has exactly four fields; a later version may add
    // fields after a dash, which are ignored.
    if version == 0xff || (version == 0 && parts.next().is_some()) {
        return None;
    }
    if trace_id.len() != 32 {
        return None;
    }
    let flags = parse_hex::<1>(flags)?[0];
    Some(SpanContext {
        trace_id: parse_trace_id(trace_id)?,
        span_id: parse_span_id(span_id)?,
        sampled: flags & 1 == 1,
    })
}

/// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`, or a lone sampling decision
/// (`0`, `1`, `d`), which names no parent (`Ok(None)`).
fn parse_b3_single(value: &str) -> Result<Option<SpanContext>, ()> {
    let value = value.trim();
    if matches!(value, "0" | "1" | "d") {
        return Ok(None);
    }
    let mut parts = value.split('-');
    let trace_id = parts.next().and_then(parse_trace_id).ok_or(())?;
    let span_id = parts.next().and_then(parse_span_id).ok_or(())?;
    let sampled = match parts.next() {
        None => true,
        Some("1" | "d") => true,
        Some("0") => false,
        Some(_) => return Err(()),
    };
    if let Some(parent) = parts.next() {
        parse_span_id(parent).ok_or(())?;
    }
    if parts.next().is_some() {
        return Err(());
    }
    Ok(Some(SpanContext {
        trace_id,
        span_id,
        sampled,
    }))
}

fn parse_b3_multi(headers: &HeaderMap) -> Option<SpanContext> {
    let get = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let trace_id = parse_trace_id(get(&B3_TRACE_ID)?.trim())?;
    let span_id = parse_span_id(get(&B3_SPAN_ID)?.trim())?;
    let debug = get(&B3_FLAGS).is_some_and(|f| f.trim() == "1");
    let sampled = match get(&B3_SAMPLED).map(str::trim) {
        // No decision passed: sample (the caller deferred to us, and the parent-based
        // choice is to follow a parent that asked to be traced).
        None => true,
        Some("1" | "true") => true,
        Some("0" | "false") => debug,
        Some(_) => return None,
    };
    Some(SpanContext {
        trace_id,
        span_id,
        sampled: sampled || debug,
    })
}

/// Writes `span` into `headers` for the next hop: `traceparent` (and `tracestate`) always,
/// and B3 in each format the request came with, so callers that only read B3 keep working.
pub fn inject(
    headers: &mut HeaderMap,
    span: &SpanContext,
    tracestate: Option<&HeaderValue>,
    formats: Formats,
) {
    let value = |s: String| HeaderValue::try_from(s).expect("hex and dashes are a valid header");
    headers.insert(TRACEPARENT, value(span.traceparent()));
    match tracestate {
        Some(state) => {
            headers.insert(TRACESTATE, state.clone());
        }
        None => {
            headers.remove(TRACESTATE);
        }
    }
    if formats.b3_single {
        headers.insert(B3, value(span.b3()));
    }
    if formats.b3_multi {
        headers.insert(B3_TRACE_ID, value(span.trace_id.to_string()));
        headers.insert(B3_SPAN_ID, value(span.span_id.to_string()));
        headers.insert(
            B3_SAMPLED,
            HeaderValue::from_static(if span.sampled { "1" } else { "0" }),
        );
        headers.remove(B3_PARENT_SPAN_ID);
        headers.remove(B3_FLAGS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_a_w3c_traceparent_and_keeps_tracestate() {
        let got = extract(&headers(&[("traceparent", TP), ("tracestate", "vendor=1")]));
        let parent = got.parent.unwrap();
        assert_eq!(
            parent.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parent.span_id.to_string(), "00f067aa0ba902b7");
        assert!(parent.sampled);
        assert_eq!(got.tracestate.unwrap(), "vendor=1");
        assert_eq!(got.malformed, None);
        assert_eq!(parent.traceparent(), TP);
    }

    #[test]
    fn an_unsampled_parent_stays_unsampled() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!parse_traceparent(tp).unwrap().sampled);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
        let got = extract(&headers(&[("traceparent", "nope")]));
        assert_eq!(got.parent, None);
        assert_eq!(got.malformed, Some("traceparent"));
    }

    #[test]
    fn reads_b3_single_and_multi() {
        let single = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]));
        let p = single.parent.unwrap();
        assert_eq!(p.trace_id.to_string(), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(p.span_id.to_string(), "e457b5a2e4d86bd1");
        assert!(p.sampled);
        assert!(single.formats.b3_single);

        let multi = extract(&headers(&[
            ("x-b3-traceid", "64fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "0"),
        ]));
        let p = multi.parent.unwrap();
        assert_eq!(p.trace_id.to_string(), "000000000000000064fe8b2a57d3eff7");
        assert!(!p.sampled);
        assert!(multi.formats.b3_multi);

        // A lone decision is no parent and not malformed.
        let decision = extract(&headers(&[("b3", "0")]));
        assert_eq!(decision.parent, None);
        assert_eq!(decision.malformed, None);

        let bad = extract(&headers(&[("b3", "xyz-e457b5a2e4d86bd1")]));
        assert_eq!(bad.malformed, Some("b3"));
        let bad = extract(&headers(&[("x-b3-traceid", "64fe8b2a57d3eff7")]));
        assert_eq!(bad.malformed, Some("x-b3-traceid"));
    }

    #[test]
    fn w3c_wins_over_b3() {
        let got = extract(&headers(&[
            ("traceparent", TP),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ]));
        assert_eq!(
            got.parent.unwrap().trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        // A malformed traceparent falls back to B3, still counted.
        let got = extract(&headers(&[
            ("traceparent", "bad"),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ]));
        assert_eq!(
            got.parent.unwrap().trace_id.to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(got.malformed, Some("traceparent"));
    }

    #[test]
    fn inject_writes_the_formats_that_came() {
        let span = SpanContext {
            trace_id: parse_trace_id("80f198ee56343ba864fe8b2a57d3eff7").unwrap(),
            span_id: parse_span_id("1111111111111111").unwrap(),
            sampled: true,
        };
        let mut h = headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
        ]);
        let formats = extract(&h).formats;
        inject(&mut h, &span, None, formats);
        assert_eq!(
            h["traceparent"],
            "00-80f198ee56343ba864fe8b2a57d3eff7-1111111111111111-01"
        );
        assert_eq!(h["x-b3-spanid"], "1111111111111111");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!h.contains_key("x-b3-parentspanid"));
        assert!(!h.contains_key("b3"));
        // And the round trip reads the same span.
        assert_eq!(extract(&h).parent, Some(span));
    }
}
