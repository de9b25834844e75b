//! Scalar quantities used in service specs: CPU (millicores), memory (bytes) and durations.
//!
//! Each has a textual form that is accepted on input and a canonical form that is produced on output,
//! so that a spec serialized and parsed again compares equal.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What `cpu` accepts, used in error messages.
pub const CPU_ALLOWED: &str =
    "a non-negative number of cores such as 0.25 or 2, or a millicore string such as \"250m\" (1 core = 1000m)";
/// What `memory` accepts, used in error messages.
pub const MEMORY_ALLOWED: &str = "a whole number of bytes, or a whole number with a suffix: Ki, Mi, Gi, Ti (powers of 1024) or \
     K, M, G, T (powers of 1000), such as 64Mi or 1G";
/// What a duration accepts, used in error messages.
pub const DURATION_ALLOWED: &str = "a duration string made of whole numbers with units h, m, s, ms, us or ns, such as \"2s\", \"500ms\", \"1m30s\" or \"0s\"";

/// A CPU amount in millicores (1 core = 1000).
///
/// Accepts a number of cores (`0.25`, `2`) or a millicore string (`"250m"`); serializes as `"250m"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cpu(pub u64);

impl Cpu {
    /// Millicores.
    pub fn millis(self) -> u64 {
        self.0
    }

    /// Parses `"250m"`, `"0.25"` or `"2"`.
    pub fn parse(text: &str) -> Result<Cpu, String> {
        let t = text.trim();
        if let Some(milli) = t.strip_suffix('m') {
            if !milli.is_empty() && milli.bytes().all(|b| b.is_ascii_digit()) {
                return milli
                    .parse::<u64>()
                    .map(Cpu)
                    .map_err(|_| format!("cpu `{text}` is too large; allowed: {CPU_ALLOWED}"));
            }
            return Err(format!("invalid cpu `{text}`; allowed: {CPU_ALLOWED}"));
        }
        let valid_decimal = !t.is_empty()
            && t.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && t.bytes().filter(|&b| b == b'.').count() <= 1
            && t.bytes().any(|b| b.is_ascii_digit());
        if !valid_decimal {
            return Err(format!("invalid cpu `{text}`; allowed: {CPU_ALLOWED}"));
        }
        let cores: f64 = t.parse().map_err(|_| format!("invalid cpu `{text}`; allowed: {CPU_ALLOWED}"))?;
        Cpu::from_cores(cores)
    }

    /// Converts a number of cores, which must be a non-negative multiple of 0.001.
    pub fn from_cores(cores: f64) -> Result<Cpu, String> {
        if !cores.is_finite() || cores < 0.0 {
            return Err(format!("invalid cpu {cores}; allowed: {CPU_ALLOWED}"));
        }
        let millis = cores * 1000.0;
        let rounded = millis.round();
        if (millis - rounded).abs() > 1e-6 {
            return Err(format!("cpu {cores} is finer than one millicore; allowed: multiples of 0.001 cores (\"1m\")"));
        }
        if rounded > u64::MAX as f64 / 2.0 {
            return Err(format!("cpu {cores} is too large; allowed: {CPU_ALLOWED}"));
        }
        Ok(Cpu(rounded as u64))
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}m", self.0)
    }
}

impl Serialize for Cpu {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cpu {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Cpu;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(CPU_ALLOWED)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Cpu, E> {
                v.checked_mul(1000)
                    .map(Cpu)
                    .ok_or_else(|| E::custom(format!("cpu {v} is too large; allowed: {CPU_ALLOWED}")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Cpu, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("cpu {v} is negative; allowed: {CPU_ALLOWED}"))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Cpu, E> {
                Cpu::from_cores(v).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cpu, E> {
                Cpu::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A memory amount in bytes.
///
/// Accepts a number of bytes or a string with a suffix (`"64Mi"`, `"1G"`); serializes as a number of bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Memory(pub u64);

impl Memory {
    /// Bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parses `"67108864"`, `"64Mi"`, `"1G"`.
    pub fn parse(text: &str) -> Result<Memory, String> {
        let t = text.trim();
        let digits_end = t.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(t.len());
        let (number, suffix) = t.split_at(digits_end);
        if number.is_empty() {
            return Err(format!("invalid memory `{text}`; allowed: {MEMORY_ALLOWED}"));
        }
        if suffix.starts_with('.') {
            return Err(format!(
                "memory `{text}` is not a whole number; allowed: {MEMORY_ALLOWED} (write 1536Mi instead of 1.5Gi)"
            ));
        }
        let multiplier: u64 = match suffix {
            "" => 1,
            "K" => 1000,
            "M" => 1000u64.pow(2),
            "G" => 1000u64.pow(3),
            "T" => 1000u64.pow(4),
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            other => {
                return Err(format!("unknown memory suffix `{other}` in `{text}`; allowed: {MEMORY_ALLOWED}"));
            }
        };
        number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(multiplier))
            .map(Memory)
            .ok_or_else(|| format!("memory `{text}` is too large; allowed: at most {} bytes", u64::MAX))
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Memory {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Memory {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Memory;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(MEMORY_ALLOWED)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Memory, E> {
                Ok(Memory(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Memory, E> {
                u64::try_from(v)
                    .map(Memory)
                    .map_err(|_| E::custom(format!("memory {v} is negative; allowed: {MEMORY_ALLOWED}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Memory, E> {
                Err(E::custom(format!("memory {v} is not a whole number; allowed: {MEMORY_ALLOWED}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Memory, E> {
                Memory::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

const UNITS: [(&str, u128); 6] = [
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses a duration such as `"2s"`, `"500ms"`, `"1m30s"` or `"0"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() {
        return Err(format!("empty duration; allowed: {DURATION_ALLOWED}"));
    }
    let mut rest = t;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits_end = rest.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(rest.len());
        if digits_end == 0 {
            return Err(format!("invalid duration `{text}`; allowed: {DURATION_ALLOWED}"));
        }
        let number: u128 = rest[..digits_end]
            .parse()
            .map_err(|_| format!("duration `{text}` is too large; allowed: {DURATION_ALLOWED}"))?;
        rest = &rest[digits_end..];
        let unit_end = rest.bytes().position(|b| b.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let Some(&(_, nanos)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            let why = if unit.is_empty() {
                "a number without a unit".to_string()
            } else if unit.starts_with('.') {
                "fractions are not supported".to_string()
            } else {
                format!("unknown unit `{unit}`")
            };
            return Err(format!("invalid duration `{text}` ({why}); allowed: {DURATION_ALLOWED}"));
        };
        total = number
            .checked_mul(nanos)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| format!("duration `{text}` is too large"))?;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| format!("duration `{text}` is too large"))?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Formats a duration with the largest unit that represents it exactly (`"2s"`, `"500ms"`, `"0s"`).
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    for (name, unit) in UNITS {
        if nanos.is_multiple_of(unit) {
            return format!("{}{name}", nanos / unit);
        }
    }
    format!("{nanos}ns")
}

/// `#[serde(with = "duration")]` for [`Duration`] fields written as `"2s"`.
pub mod duration {
    use super::*;

    /// Serializes as a duration string.
    pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(*d))
    }

    /// Deserializes a duration string (a bare `0` is also accepted).
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(DURATION_ALLOWED)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                if v == 0 {
                    Ok(Duration::ZERO)
                } else {
                    Err(E::custom(format!(
                        "duration {v} has no unit; allowed: {DURATION_ALLOWED} (write \"{v}s\" for seconds)"
                    )))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("duration {v} is negative; allowed: {DURATION_ALLOWED}"))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Err(E::custom(format!("duration {v} has no unit; allowed: {DURATION_ALLOWED}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                parse_duration(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_forms() {
        assert_eq!(Cpu::parse("250m"), Ok(Cpu(250)));
        assert_eq!(Cpu::parse("0.25"), Ok(Cpu(250)));
        assert_eq!(Cpu::parse("2"), Ok(Cpu(2000)));
        assert_eq!(Cpu::from_cores(0.1), Ok(Cpu(100)));
        assert!(Cpu::parse("-1").is_err());
        assert!(Cpu::parse("1.5x").is_err());
        assert!(Cpu::from_cores(0.0001).is_err());
        assert!(Cpu::from_cores(-0.5).is_err());
    }

    #[test]
    fn memory_forms() {
        assert_eq!(Memory::parse("64Mi"), Ok(Memory(67_108_864)));
        assert_eq!(Memory::parse("1G"), Ok(Memory(1_000_000_000)));
        assert_eq!(Memory::parse("2Ki"), Ok(Memory(2048)));
        assert_eq!(Memory::parse("1Ti"), Ok(Memory(1 << 40)));
        assert_eq!(Memory::parse("512"), Ok(Memory(512)));
        let err = Memory::parse("64MB").unwrap_err();
        assert!(err.contains("`MB`") && err.contains("Mi"), "{err}");
        assert!(Memory::parse("1.5Gi").is_err());
        assert!(Memory::parse("Mi").is_err());
        assert!(Memory::parse("99999999999999Ti").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
        for bad in ["", "2", "s", "2x", "1.5s", "-1s", "2 s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        for d in [0, 1, 999, 1_000_000, 1_500_000_000, 2_000_000_000, 90_000_000_000, 3_600_000_000_000] {
            let d = Duration::from_nanos(d);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
    }
}
