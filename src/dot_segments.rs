//! `.` and `..` path segments, raw or percent-encoded: the way out of a prefix.
//!
//! A URL from table metadata (`file:///wh/../../etc/passwd`) or a request path
//! (`/v1/../../management/v1/principals`) that carries them can reach outside
//! the prefix it appears to be under, on any server or filesystem that
//! resolves them. icerelay never resolves them itself; it refuses them.

/// Whether `path` has a `.` or `..` segment, also when percent-encoded
/// (`%2e%2E`) or hidden behind an encoded separator (`%2e%2e%2f`).
pub fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        if !segment.contains('.') && !segment.contains('%') {
            return false;
        }
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        // Servlet containers drop a `;parameter` before resolving `..;`.
        decoded.split(['/', '\\']).any(|part| {
            let part = part.split(';').next().unwrap_or(part);
            part == "." || part == ".."
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_encoded_and_hidden_dot_segments_are_found() {
        for path in [
            "/v1/../x",
            "/v1/./x",
            "/v1/%2e%2e/x",
            "/v1/%2E./x",
            "/v1/a%2f..%2fb",
            "/v1/a%5c..",
            "/x/..",
            "/v1/..;/x",
            "/v1/..%3bx/y",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in ["/v1/wh/namespaces/a.b/tables/t", "/v1/...", "/v1/a%1Fb", "/v1/.hidden", "/v1/x..y"] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }
}
