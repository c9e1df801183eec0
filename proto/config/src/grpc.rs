//! gRPC status codes as retry conditions are written: by name (`UNAVAILABLE`) or by number
//! (`14`). A code that is neither is refused when the resource is parsed, naming the field.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One of the 17 gRPC status codes. Serialized by its canonical name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

const ALL: [(GrpcCode, &str); 17] = [
    (GrpcCode::Ok, "OK"),
    (GrpcCode::Cancelled, "CANCELLED"),
    (GrpcCode::Unknown, "UNKNOWN"),
    (GrpcCode::InvalidArgument, "INVALID_ARGUMENT"),
    (GrpcCode::DeadlineExceeded, "DEADLINE_EXCEEDED"),
    (GrpcCode::NotFound, "NOT_FOUND"),
    (GrpcCode::AlreadyExists, "ALREADY_EXISTS"),
    (GrpcCode::PermissionDenied, "PERMISSION_DENIED"),
    (GrpcCode::ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (GrpcCode::FailedPrecondition, "FAILED_PRECONDITION"),
    (GrpcCode::Aborted, "ABORTED"),
    (GrpcCode::OutOfRange, "OUT_OF_RANGE"),
    (GrpcCode::Unimplemented, "UNIMPLEMENTED"),
    (GrpcCode::Internal, "INTERNAL"),
    (GrpcCode::Unavailable, "UNAVAILABLE"),
    (GrpcCode::DataLoss, "DATA_LOSS"),
    (GrpcCode::Unauthenticated, "UNAUTHENTICATED"),
];

impl GrpcCode {
    /// The numeric code carried in the `grpc-status` trailer.
    pub fn number(self) -> u8 {
        self as u8
    }

    pub fn from_number(n: u64) -> Option<Self> {
        ALL.iter()
            .find(|(c, _)| u64::from(c.number()) == n)
            .map(|(c, _)| *c)
    }

    /// The canonical upper-case name (`"UNAVAILABLE"`).
    pub fn name(self) -> &'static str {
        ALL[usize::from(self.number())].1
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a gRPC code was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a gRPC status code: use a name such as UNAVAILABLE or a number 0..=16")]
pub struct GrpcCodeError(String);

impl FromStr for GrpcCode {
    type Err = GrpcCodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(n) = s.parse::<u64>() {
            return Self::from_number(n).ok_or_else(|| GrpcCodeError(s.to_string()));
        }
        ALL.iter()
            .find(|(_, name)| name.eq_ignore_ascii_case(s))
            .map(|(c, _)| *c)
            .ok_or_else(|| GrpcCodeError(s.to_string()))
    }
}

impl Serialize for GrpcCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for GrpcCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = GrpcCode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a gRPC status code name (UNAVAILABLE) or number (0..=16)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<GrpcCode, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<GrpcCode, E> {
                GrpcCode::from_number(v).ok_or_else(|| E::custom(GrpcCodeError(v.to_string())))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<GrpcCode, E> {
                u64::try_from(v)
                    .ok()
                    .and_then(GrpcCode::from_number)
                    .ok_or_else(|| E::custom(GrpcCodeError(v.to_string())))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        for (i, (code, name)) in ALL.iter().enumerate() {
            assert_eq!(usize::from(code.number()), i);
            assert_eq!(code.name(), *name);
            assert_eq!(name.parse::<GrpcCode>().unwrap(), *code);
            assert_eq!(i.to_string().parse::<GrpcCode>().unwrap(), *code);
        }
        assert_eq!(
            "unavailable".parse::<GrpcCode>().unwrap(),
            GrpcCode::Unavailable
        );
        assert!("17".parse::<GrpcCode>().is_err());
        assert!("UNAVAILIBLE".parse::<GrpcCode>().is_err());
    }

    #[test]
    fn serde_forms() {
        let codes: Vec<GrpcCode> = serde_json::from_str(r#"["UNAVAILABLE", 4, "14"]"#).unwrap();
        assert_eq!(
            codes,
            [
                GrpcCode::Unavailable,
                GrpcCode::DeadlineExceeded,
                GrpcCode::Unavailable
            ]
        );
        assert_eq!(
            serde_json::to_string(&codes[1]).unwrap(),
            r#""DEADLINE_EXCEEDED""#
        );
        assert!(serde_json::from_str::<GrpcCode>("17").is_err());
        assert!(serde_json::from_str::<GrpcCode>("-1").is_err());
    }
}
