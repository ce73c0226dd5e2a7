//! Kubernetes resource quantities (`512Mi`, `2G`, `1.5Gi`, `1e9`) as byte counts, for the guest
//! memory arithmetic of the launcher pod. The API server has validated the syntax already; what
//! it accepts and this does not is reported, never guessed.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "{0:?} is not a memory quantity ferrovirt understands (use a whole number with an optional Ki, Mi, Gi, Ti, k, M, G or T suffix, such as 512Mi)"
    )]
    Syntax(String),
    #[error("{0:?} is too large")]
    Overflow(String),
}

/// Bytes in `q`, rounded up to a whole byte.
pub fn to_bytes(q: &str) -> Result<u64, Error> {
    let syntax = || Error::Syntax(q.to_owned());
    let s = q.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        e if e.starts_with(['e', 'E']) => {
            let exp: u32 = e[1..].parse().map_err(|_| syntax())?;
            10u128
                .checked_pow(exp)
                .ok_or_else(|| Error::Overflow(q.to_owned()))?
        }
        _ => return Err(syntax()),
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() {
        return Err(syntax());
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| syntax())?
    };
    let scale = 10u128
        .checked_pow(u32::try_from(frac.len()).map_err(|_| syntax())?)
        .ok_or_else(|| Error::Overflow(q.to_owned()))?;
    let frac: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| syntax())?
    };
    let overflow = || Error::Overflow(q.to_owned());
    let total = whole
        .checked_mul(scale)
        .and_then(|w| w.checked_add(frac))
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(overflow)?;
    u64::try_from(total.div_ceil(scale)).map_err(|_| overflow())
}

/// `bytes` as a quantity string, in Mi when it is a whole number of MiB.
pub fn from_bytes(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{}Mi", bytes >> 20)
    } else {
        bytes.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_decimal_fractional_and_exponent_forms() {
        assert_eq!(to_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(to_bytes("2Gi"), Ok(2 << 30));
        assert_eq!(to_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(to_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(to_bytes("1e6"), Ok(1_000_000));
        assert_eq!(to_bytes("4096"), Ok(4096));
        assert_eq!(to_bytes("0.5Ki"), Ok(512));
        assert_eq!(from_bytes(544 << 20), "544Mi");
        assert_eq!(from_bytes(1000), "1000");
    }

    #[test]
    fn bad_quantities_are_errors_not_guesses() {
        for bad in ["", "Mi", "12Qi", "-1Gi", "1.2.3", "1e999", "99999999Pi"] {
            assert!(to_bytes(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
