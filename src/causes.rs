//! Error texts with their causes.
//!
//! Transport errors keep the useful part in their sources: reqwest says
//! "error sending request", and only its causes say that the peer's
//! certificate was not trusted or the connection was refused. Messages that
//! reach an operator carry the whole chain, and a certificate problem gets the
//! setting that fixes it.

use std::error::Error;

/// `e` and its causes, joined with `: `; a cause whose text the previous one
/// already contains is skipped.
pub fn chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// [`chain`] of a connection error, with a hint when TLS refused the peer's
/// certificate.
pub fn transport(e: &dyn Error) -> String {
    let text = chain(e);
    if text.contains("certificate") {
        format!("{text} (if the server's certificate is issued by a private CA, set ca_file to that CA's PEM file)")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    #[test]
    fn causes_are_joined_once_and_certificate_errors_get_the_hint() {
        let inner = Layer { text: "invalid peer certificate: UnknownIssuer", source: None };
        let middle = Layer { text: "invalid peer certificate: UnknownIssuer", source: Some(Box::new(inner)) };
        let outer = Layer { text: "error sending request", source: Some(Box::new(middle)) };
        assert_eq!(chain(&outer), "error sending request: invalid peer certificate: UnknownIssuer");
        assert!(transport(&outer).contains("set ca_file"));
        let refused = Layer { text: "connection refused", source: None };
        assert_eq!(transport(&refused), "connection refused");
    }
}
