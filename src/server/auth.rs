//! Optional API keys: with keys configured, the API routes need `Authorization: Bearer <key>`.
//! The probes are always open, and `/metrics` unless `--protect-metrics`. Keys are compared in
//! constant time (for keys of the same length) and never logged or echoed.

use std::path::Path;

use subtle::ConstantTimeEq;

/// The accepted keys. Its `Debug` shows only how many there are.
#[derive(Clone)]
pub struct ApiKeys(Vec<Vec<u8>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

impl ApiKeys {
    /// Keys given on the command line (or `FASTERNET_API_KEY`, comma-separated) and in a file
    /// with one key per line (blank lines and `#` comments skipped). `None` when there are
    /// none: the API is open.
    pub fn load(inline: &[String], file: Option<&Path>) -> Result<Option<Self>, String> {
        let mut keys: Vec<String> = inline.iter().map(|k| k.trim().to_string()).collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the API key file {}: {e}", path.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string),
            );
        }
        if keys.iter().any(|k| k.is_empty()) {
            return Err("an API key is empty".into());
        }
        if let Some(bad) = keys.iter().position(|k| !k.bytes().all(|b| b.is_ascii_graphic())) {
            return Err(format!(
                "API key {} has characters outside printable ASCII (no spaces)",
                bad + 1
            ));
        }
        Ok((!keys.is_empty()).then(|| Self(keys.into_iter().map(String::into_bytes).collect())))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an `Authorization` header value carries one of the keys. Every key is
    /// compared, so the time does not tell which one matched.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(token) = authorization.and_then(bearer_token) else { return false };
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |found, key| found | key.as_slice().ct_eq(token))
            .into()
    }
}

/// `Bearer <token>`, the scheme case-insensitive (RFC 9110).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| token.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_flags_and_file_and_what_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# rotated in on Monday\nnew-key-2\n\n  old-key-1  \n").unwrap();
        let keys = ApiKeys::load(&["inline-key".into()], Some(&file)).unwrap().unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(format!("{keys:?}"), "ApiKeys(3 keys)");
        for good in ["Bearer inline-key", "bearer new-key-2", "BEARER old-key-1 "] {
            assert!(keys.accepts(Some(good.as_bytes())), "{good}");
        }
        for bad in [
            "Bearer inline-ke",
            "Bearer inline-key2",
            "Basic aW5saW5lLWtleQ==",
            "inline-key",
            "Bearer ",
            "",
        ] {
            assert!(!keys.accepts(Some(bad.as_bytes())), "{bad}");
        }
        assert!(!keys.accepts(None));
        assert!(ApiKeys::load(&[], None).unwrap().is_none(), "no keys: open");
        assert!(ApiKeys::load(&["has space".into()], None).is_err());
        assert!(ApiKeys::load(&[], Some(&dir.path().join("missing"))).is_err());
    }
}
