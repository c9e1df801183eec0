//! Durations as people write them in config: `"250ms"`, `"5s"`, `"1m 30s"`.
//!
//! Every duration field of every resource is an `Option<Duration>` read and written through
//! [`option`], so a spec serializes back to the same strings a user would type, and a value
//! such as `"-1s"` or `5` is refused at parse time with the field's path.

use std::time::Duration;

/// Parses a humantime duration, explaining the accepted form when it is not one.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| {
        format!("invalid duration {text:?} ({e}); write a positive number and a unit, e.g. \"250ms\", \"5s\", \"1m\"")
    })
}

/// Formats a duration the way [`parse`] reads it back (`"1m 30s"`, `"250ms"`).
pub(crate) fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `#[serde(with = "crate::duration::required")]` for `Duration` fields that must be given.
pub(crate) mod required {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::option::deserialize(d)?
            .ok_or_else(|| serde::de::Error::custom("a duration is required here"))
    }
}

/// `#[serde(with = "crate::duration::option", default)]` for `Option<Duration>` fields.
pub(crate) mod option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format(*d)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        match Option::<Text>::deserialize(d)? {
            Some(Text(text)) => super::parse(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }

    /// A string with an error message that says a duration, not "a string", was expected.
    struct Text(String);

    impl<'de> Deserialize<'de> for Text {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = Text;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a duration string such as \"250ms\" or \"5s\"")
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
            }
            d.deserialize_str(Visitor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_negatives() {
        for text in ["250ms", "5s", "1m 30s", "1h"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        let err = parse("-1s").unwrap_err();
        assert!(err.contains("\"-1s\""), "{err}");
        assert!(parse("5").is_err());
    }
}
