//! Rust UDFs that type the raw DMS strings, one file per function. Each is a pure `&str -> Option<T>`
//! parser; [`TextFunction`] lifts it into a DataFusion scalar function over any string column. Values that
//! do not parse give NULL, so that a stage's expectations can name the offending row. One aggregate,
//! `count_repeated` ([`repeated`]), counts the keys a column holds more than once, for uniqueness checks;
//! `count` is DataFusion's, with a faster `COUNT(DISTINCT integer)` per group ([`distinct`]).

mod card;
mod channel;
mod distinct;
mod money;
pub mod repeated;
mod timestamp;
mod zip;

use std::{fmt::Write, sync::Arc};

use datafusion::{
    arrow::{
        array::{
            Array, ArrayRef, AsArray, Date32Array, Decimal128Array, StringArrayType, StringBuilder,
            TimestampMicrosecondArray,
        },
        datatypes::{DataType, TimeUnit},
    },
    common::{DataFusionError, Result},
    logical_expr::{
        ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
    },
    prelude::SessionContext,
};

pub use card::card_last4;
pub use channel::parse_channel;
pub use money::parse_money;
pub use timestamp::{parse_month, parse_ts};
pub use zip::parse_zip;

/// Precision and scale of every money column.
pub const MONEY_PRECISION: u8 = 18;
pub const MONEY_SCALE: i8 = 2;

/// Registers every medallion UDF on `ctx`.
pub fn register_all(ctx: &SessionContext) {
    for kind in Parser::ALL {
        ctx.register_udf(ScalarUDF::from(TextFunction::new(kind)));
    }
    ctx.register_udaf(repeated::count_repeated());
    ctx.register_udaf(distinct::count());
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Parser {
    Money,
    Zip,
    Channel,
    Last4,
    Timestamp,
    Month,
}

impl Parser {
    const ALL: [Parser; 6] = [
        Parser::Money,
        Parser::Zip,
        Parser::Channel,
        Parser::Last4,
        Parser::Timestamp,
        Parser::Month,
    ];

    fn name(self) -> &'static str {
        match self {
            Parser::Money => "parse_money",
            Parser::Zip => "parse_zip",
            Parser::Channel => "parse_channel",
            Parser::Last4 => "card_last4",
            Parser::Timestamp => "parse_ts",
            Parser::Month => "parse_month",
        }
    }

    fn output(self) -> DataType {
        match self {
            Parser::Money => DataType::Decimal128(MONEY_PRECISION, MONEY_SCALE),
            Parser::Zip | Parser::Channel | Parser::Last4 => DataType::Utf8,
            Parser::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Parser::Month => DataType::Date32,
        }
    }

    /// Applies the parser to every value of a string column of any of the three string types, read
    /// where it is (Bronze's strings arrive as views: a cast to `Utf8` copied every value first).
    fn apply(self, input: &ArrayRef) -> Result<ArrayRef> {
        match input.data_type() {
            DataType::Utf8 => self.apply_to(input.as_string::<i32>()),
            DataType::LargeUtf8 => self.apply_to(input.as_string::<i64>()),
            DataType::Utf8View => self.apply_to(input.as_string_view()),
            other => Err(DataFusionError::Execution(format!(
                "{} takes a string, not {other}",
                self.name()
            ))),
        }
    }

    fn apply_to<'a, S: StringArrayType<'a>>(self, input: S) -> Result<ArrayRef> {
        // String results go straight into one builder: no `String` per row.
        let text = |f: &dyn Fn(&str, &mut StringBuilder) -> bool| -> ArrayRef {
            let mut out = StringBuilder::with_capacity(input.len(), input.len() * 6);
            for value in input.iter() {
                match value {
                    Some(v) if f(v, &mut out) => {}
                    _ => out.append_null(),
                }
            }
            Arc::new(out.finish())
        };
        Ok(match self {
            Parser::Money => Arc::new(
                input
                    .iter()
                    .map(|v| v.and_then(parse_money))
                    .collect::<Decimal128Array>()
                    .with_precision_and_scale(MONEY_PRECISION, MONEY_SCALE)?,
            ),
            Parser::Zip => text(&|v, out| match zip::zip_parts(v) {
                Some((zeros, digits)) => {
                    // Writing to a builder only appends bytes: it cannot fail.
                    let _ = out.write_str(zeros);
                    let _ = out.write_str(digits);
                    out.append_value("");
                    true
                }
                None => false,
            }),
            Parser::Channel => {
                text(&|v, out| parse_channel(v).map(|c| out.append_value(c)).is_some())
            }
            Parser::Last4 => text(&|v, out| card_last4(v).map(|l| out.append_value(l)).is_some()),
            Parser::Timestamp => Arc::new(
                input
                    .iter()
                    .map(|v| v.and_then(parse_ts))
                    .collect::<TimestampMicrosecondArray>(),
            ),
            Parser::Month => Arc::new(
                input
                    .iter()
                    .map(|v| v.and_then(parse_month))
                    .collect::<Date32Array>(),
            ),
        })
    }
}

/// A one-argument scalar function from text to a typed value.
#[derive(Debug, PartialEq, Eq, Hash)]
struct TextFunction {
    parser: Parser,
    signature: Signature,
}

impl TextFunction {
    fn new(parser: Parser) -> TextFunction {
        TextFunction {
            parser,
            signature: Signature::uniform(
                1,
                vec![DataType::Utf8, DataType::Utf8View, DataType::LargeUtf8],
                Volatility::Immutable,
            ),
        }
    }
}

impl ScalarUDFImpl for TextFunction {
    fn name(&self) -> &str {
        self.parser.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(self.parser.output())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [input] = arrays.as_slice() else {
            return Err(DataFusionError::Execution(format!(
                "{} takes exactly one argument",
                self.name()
            )));
        };
        Ok(ColumnarValue::Array(self.parser.apply(input)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, LargeStringArray, StringArray, StringViewArray};

    #[test]
    fn every_parser_reads_the_three_string_types_alike_and_gives_null_where_a_value_fails() {
        let values = [
            Some("58523.0"),
            Some("6071.0"),
            None,
            Some(""),
            Some("Swipe Transaction"),
            Some("Online Transaction"),
            Some("$-77.00"),
            Some("2010-01-01 00:01:00"),
            Some("09/2022"),
            Some("4344 6760 3124 1102"),
            Some("a string longer than the twelve bytes a view holds inline"),
        ];
        let plain: ArrayRef = Arc::new(StringArray::from(values.to_vec()));
        let large: ArrayRef = Arc::new(LargeStringArray::from(values.to_vec()));
        let view: ArrayRef = Arc::new(StringViewArray::from(values.to_vec()));
        for parser in Parser::ALL {
            let expected = parser.apply(&plain).unwrap();
            assert_eq!(expected.len(), values.len());
            assert_eq!(expected.data_type(), &parser.output());
            assert_eq!(
                &parser.apply(&large).unwrap(),
                &expected,
                "{}",
                parser.name()
            );
            assert_eq!(
                &parser.apply(&view).unwrap(),
                &expected,
                "{}",
                parser.name()
            );
        }
        let zips = Parser::Zip.apply(&view).unwrap();
        let zips = zips.as_string::<i32>();
        assert_eq!(
            zips.iter().take(4).collect::<Vec<_>>(),
            [Some("58523"), Some("06071"), None, None]
        );
        let channels = Parser::Channel.apply(&view).unwrap();
        let channels = channels.as_string::<i32>();
        assert_eq!(
            channels.iter().skip(4).take(3).collect::<Vec<_>>(),
            [Some("SWIPE"), Some("ONLINE"), None]
        );
        let last4 = Parser::Last4.apply(&view).unwrap();
        assert_eq!(last4.as_string::<i32>().value(9), "1102");
        let wrong: ArrayRef = Arc::new(Int64Array::from(vec![1]));
        let error = Parser::Zip.apply(&wrong).unwrap_err().to_string();
        assert!(error.contains("parse_zip takes a string"), "{error}");
    }
}
