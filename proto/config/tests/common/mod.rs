//! Helpers shared by the validation suites (`validate.rs`, `authz.rs`): what `validate`
//! reports for a text, and assertions on it.
// Each suite is its own crate and uses only some of these.
#![allow(dead_code)]

use std::collections::BTreeSet;

use ferrule_config::{Resource, ValidationErrors, validate};

pub fn parse(text: &str) -> Vec<Resource> {
    Resource::parse_documents(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The (field, reason) pairs `validate` reports for `text` (which must parse).
pub fn errors_with(text: &str, known: Option<&BTreeSet<String>>) -> Vec<(String, String)> {
    match validate(&parse(text), known) {
        Ok(()) => Vec::new(),
        Err(ValidationErrors(errors)) => errors.into_iter().map(|e| (e.field, e.reason)).collect(),
    }
}

pub fn errors(text: &str) -> Vec<(String, String)> {
    errors_with(text, None)
}

/// Asserts exactly one error, on `field`, whose reason contains `reason`.
pub fn assert_refused(text: &str, field: &str, reason: &str) {
    let errs = errors(text);
    assert_eq!(
        errs.len(),
        1,
        "expected one error on {field}, got {errs:?}\n{text}"
    );
    assert_eq!(errs[0].0, field, "{errs:?}");
    assert!(
        errs[0].1.contains(reason),
        "reason {:?} lacks {reason:?}",
        errs[0].1
    );
}

pub fn assert_valid(text: &str) {
    assert_eq!(errors(text), Vec::<(String, String)>::new(), "{text}");
}
