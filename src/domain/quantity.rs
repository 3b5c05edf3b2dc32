//! Quantities: exact decimals, parsed by one rule wherever they enter (a usage event, a check).
//!
//! A JSON number and a string are read alike, from their text: `-`, then `0` or digits without
//! a leading zero, then optionally `.` and digits. No exponent, no `+`, no spaces, no `NaN` or
//! `Infinity`, and at most [`MAX_DIGITS`] digits in all, so that every accepted quantity is held
//! exactly by `Decimal` and none is rounded. (JSON numbers reach this text whole because
//! serde_json is built with `arbitrary_precision`.)

use rust_decimal::Decimal;
use serde_json::Value;

/// Most digits a quantity may have (the leading `0` of `0.5` not counted): every such decimal
/// fits `Decimal` exactly (a 96-bit mantissa, at most 28 digits after the point).
pub const MAX_DIGITS: usize = 28;

/// A refused quantity: a stable `code` (`invalid_quantity` or `negative_quantity`) and a message
/// for people, the same for the same input on every route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct QuantityError {
    pub code: &'static str,
    pub message: &'static str,
}

impl QuantityError {
    const fn invalid(message: &'static str) -> Self {
        Self {
            code: "invalid_quantity",
            message,
        }
    }

    const NOT_NUMBER_OR_STRING: Self =
        Self::invalid("quantity must be a JSON number or a string holding a decimal");
    const MALFORMED: Self = Self::invalid(
        "quantity must be a plain decimal such as 12, 0.5 or -3.25: digits with an optional - \
         and . part, no spaces, no leading zeros",
    );
    const EXPONENT: Self = Self::invalid("quantity must be written without an exponent");
    const TOO_MANY_DIGITS: Self = Self::invalid(
        "quantity has more than 28 digits, more than billsync holds exactly; it is never rounded",
    );
    const NEGATIVE: Self = Self {
        code: "negative_quantity",
        message: "quantity must not be negative",
    };
}

/// Parses a quantity from a JSON value; `Ok(None)` for null (absent), whose default is the
/// caller's. A negative quantity is refused unless `negative_allowed`; zero (`-0` too) never is.
pub fn parse_quantity(
    raw: &Value,
    negative_allowed: bool,
) -> Result<Option<Decimal>, QuantityError> {
    let quantity = match raw {
        Value::Null => return Ok(None),
        // `as_str` is the number as written; it exists only with `arbitrary_precision`.
        Value::Number(n) => parse_text(n.as_str())?,
        Value::String(s) => parse_text(s)?,
        _ => return Err(QuantityError::NOT_NUMBER_OR_STRING),
    };
    if quantity.is_sign_negative() && !negative_allowed {
        return Err(QuantityError::NEGATIVE);
    }
    Ok(Some(quantity))
}

/// The decimal a quantity's text stands for, exactly.
fn parse_text(text: &str) -> Result<Decimal, QuantityError> {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (whole, after_whole) = split_digits(unsigned);
    let (fraction, rest) = match after_whole.strip_prefix('.') {
        Some(after_point) => split_digits(after_point),
        None => ("", after_whole),
    };
    let leading_zero = whole.len() > 1 && whole.starts_with('0');
    let empty_fraction = fraction.is_empty() && after_whole.starts_with('.');
    if whole.is_empty() || leading_zero || empty_fraction {
        return Err(QuantityError::MALFORMED);
    }
    if !rest.is_empty() {
        return Err(if is_exponent(rest) {
            QuantityError::EXPONENT
        } else {
            QuantityError::MALFORMED
        });
    }
    if whole.trim_start_matches('0').len() + fraction.len() > MAX_DIGITS {
        return Err(QuantityError::TOO_MANY_DIGITS);
    }
    // At most 28 digits: the mantissa is below 10^28 < 2^96, and the scale at most 28.
    let mantissa = whole
        .bytes()
        .chain(fraction.bytes())
        .fold(0_i128, |m, digit| m * 10 + i128::from(digit - b'0'));
    let mut quantity = Decimal::from_i128_with_scale(mantissa, fraction.len() as u32);
    // `-0` is zero, not a negative quantity.
    quantity.set_sign_negative(unsigned.len() != text.len() && mantissa != 0);
    Ok(quantity)
}

/// `s` split after its leading ASCII digits.
fn split_digits(s: &str) -> (&str, &str) {
    s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()))
}

/// `e` or `E`, an optional sign, and digits: an exponent as JSON writes one.
fn is_exponent(s: &str) -> bool {
    let Some(power) = s.strip_prefix(['e', 'E']) else {
        return false;
    };
    let digits = power.strip_prefix(['+', '-']).unwrap_or(power);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use serde_json::json;

    use super::*;

    fn parse(raw: Value) -> Result<Option<String>, &'static str> {
        parse_quantity(&raw, false)
            .map(|q| q.map(|q| q.to_string()))
            .map_err(|e| e.message)
    }

    #[test]
    fn numbers_and_strings_are_read_alike_and_exactly() {
        let exact = [
            ("0", "0"),
            ("-0", "0"),
            ("-0.000", "0.000"),
            ("5", "5"),
            ("2.50", "2.50"),
            ("0.1", "0.1"),
            ("1234567890123456789.25", "1234567890123456789.25"),
            (
                "9999999999999999999999999999",
                "9999999999999999999999999999",
            ),
            (
                "0.0000000000000000000000000001",
                "0.0000000000000000000000000001",
            ),
        ];
        for (text, expected) in exact {
            let number = serde_json::from_str::<Value>(text).unwrap();
            assert_eq!(parse(number), Ok(Some(expected.to_owned())), "{text}");
            assert_eq!(
                parse(json!(text)),
                Ok(Some(expected.to_owned())),
                "{text:?}"
            );
        }
    }

    #[test]
    fn bad_quantities_are_refused_with_one_message_whatever_their_json_type() {
        use QuantityError as E;
        let refused = [
            ("1e3", E::EXPONENT),
            ("1E+3", E::EXPONENT),
            ("2.5e-1", E::EXPONENT),
            ("12345678901234567890123456789", E::TOO_MANY_DIGITS),
            ("0.00000000000000000000000000001", E::TOO_MANY_DIGITS),
            ("1.0000000000000000000000000000", E::TOO_MANY_DIGITS),
            ("-1", E::NEGATIVE),
            ("-0.5", E::NEGATIVE),
        ];
        for (text, error) in refused {
            let number = serde_json::from_str::<Value>(text).unwrap();
            assert_eq!(parse(number), Err(error.message), "{text}");
            assert_eq!(parse(json!(text)), Err(error.message), "{text:?}");
        }
        // Texts no JSON number has: refused the same way as strings.
        for text in [
            "",
            " 1",
            "1 ",
            "+1",
            "01",
            "000",
            "1.",
            ".5",
            "1.2.3",
            "1,5",
            "NaN",
            "-NaN",
            "Infinity",
            "-Infinity",
            "inf",
            "0x10",
            "1e",
            "1e+",
            "e3",
            "--1",
            "-",
            "１",
        ] {
            assert_eq!(parse(json!(text)), Err(E::MALFORMED.message), "{text:?}");
        }
        for other in [json!(true), json!([1]), json!({"value": 1})] {
            assert_eq!(parse(other), Err(E::NOT_NUMBER_OR_STRING.message));
        }
        assert_eq!(parse(Value::Null), Ok(None));
    }

    #[test]
    fn negatives_pass_only_where_allowed_and_keep_their_codes() {
        let allowed = parse_quantity(&json!("-3.5"), true).unwrap();
        assert_eq!(allowed, Some(Decimal::from_str("-3.5").unwrap()));
        assert_eq!(
            parse_quantity(&json!(-3), false).unwrap_err().code,
            "negative_quantity"
        );
        assert_eq!(
            parse_quantity(&json!("1e3"), true).unwrap_err().code,
            "invalid_quantity"
        );
    }
}
