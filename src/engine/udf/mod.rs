//! Rust UDFs that type the raw DMS strings, one file per function. Each is a pure `&str -> Option<T>`
//! parser; [`TextFunction`] lifts it into a DataFusion scalar function over any string column. Values that
//! do not parse give NULL, so that a stage's expectations can name the offending row.

mod card;
mod channel;
mod money;
mod timestamp;
mod zip;

use std::sync::Arc;

use datafusion::{
    arrow::{
        array::{
            Array, ArrayRef, Date32Array, Decimal128Array, StringArray, TimestampMicrosecondArray,
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
    for kind in [
        Parser::Money,
        Parser::Zip,
        Parser::Channel,
        Parser::Last4,
        Parser::Timestamp,
        Parser::Month,
    ] {
        ctx.register_udf(ScalarUDF::from(TextFunction::new(kind)));
    }
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

    fn apply(self, input: &StringArray) -> Result<ArrayRef> {
        let each = |f: &dyn Fn(&str) -> Option<String>| -> StringArray {
            input.iter().map(|v| v.and_then(f)).collect()
        };
        Ok(match self {
            Parser::Money => Arc::new(
                input
                    .iter()
                    .map(|v| v.and_then(parse_money))
                    .collect::<Decimal128Array>()
                    .with_precision_and_scale(MONEY_PRECISION, MONEY_SCALE)?,
            ),
            Parser::Zip => Arc::new(each(&parse_zip)),
            Parser::Channel => Arc::new(each(&|v| parse_channel(v).map(str::to_string))),
            Parser::Last4 => Arc::new(each(&card_last4)),
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
        let text = datafusion::arrow::compute::cast(input, &DataType::Utf8)?;
        let text = text
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| DataFusionError::Internal("cast to Utf8 gave another type".into()))?;
        Ok(ColumnarValue::Array(self.parser.apply(text)?))
    }
}
