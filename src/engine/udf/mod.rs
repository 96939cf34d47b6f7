//! Rust UDFs that type the raw DMS strings, one file per function. Each is a pure `&str -> Option<T>`
//! parser; [`TextFunction`] lifts it into a DataFusion scalar function over any string column. Values that
//! do not parse give NULL, so that a stage's expectations can name the offending row. One aggregate,
//! `count_repeated` ([`repeated`]), counts the keys a column holds more than once, for uniqueness checks;
//! `count` is DataFusion's, with a faster `COUNT(DISTINCT integer)` per group ([`distinct`]); `TRIM` is
//! DataFusion's, without a copy of a column with nothing to trim ([`trim`]).

mod card;
mod channel;
mod distinct;
mod money;
mod regex_match;
pub mod repeated;
mod timestamp;
mod trim;
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
    ctx.register_udf(trim::trim());
    ctx.add_optimizer_rule(Arc::new(regex_match::CompiledRegex));
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
            DataType::Utf8 => self.apply_to(input.as_string::<i32>(), None),
            DataType::LargeUtf8 => self.apply_to(input.as_string::<i64>(), None),
            DataType::Utf8View => {
                let views = input.as_string_view();
                self.apply_to(views, Some(views.views()))
            }
            other => Err(DataFusionError::Execution(format!(
                "{} takes a string, not {other}",
                self.name()
            ))),
        }
    }

    /// Applies the parser to `input`, whose `views`, when it has them, let a typed parser look up a
    /// value met again in the array instead of parsing it ([`ViewMemo`]).
    fn apply_to<'a, S: StringArrayType<'a>>(
        self,
        input: S,
        views: Option<&'a [u128]>,
    ) -> Result<ArrayRef> {
        // String results go straight into one builder: no `String` per row. Their parsers cost about
        // what a lookup in the memo would, so they parse every value.
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
                parsed(input, views, parse_money)
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
            Parser::Timestamp => {
                Arc::new(parsed(input, views, parse_ts).collect::<TimestampMicrosecondArray>())
            }
            Parser::Month => Arc::new(parsed(input, views, parse_month).collect::<Date32Array>()),
        })
    }
}

/// `parse` over each value of `input`: `None` where the value is NULL or does not parse. With the
/// array's `views`, each value is looked up in a [`ViewMemo`] first.
fn parsed<'a, S: StringArrayType<'a>, T: Clone>(
    input: S,
    views: Option<&'a [u128]>,
    parse: impl Fn(&str) -> Option<T>,
) -> impl Iterator<Item = Option<T>> {
    let mut memo = views.map(|views| (views, ViewMemo::new()));
    input.iter().enumerate().map(move |(row, value)| {
        let value = value?;
        match memo
            .as_mut()
            .and_then(|(views, memo)| Some((*views.get(row)?, memo)))
        {
            Some((view, memo)) => memo.get_or(view, || parse(value)),
            None => parse(value),
        }
    })
}

/// A parser's results by string view, for the values of one array of views. Equal views hold equal
/// values: a value of up to 12 bytes is held in its view, a longer one is pointed at (buffer and
/// offset in this array), and a column read from a Parquet dictionary repeats the dictionary's views.
/// So a value met again in the array (a DMS commit time, a recurring amount) is looked up instead of
/// parsed: a timestamp's parse costs several times the lookup. The table is small and direct-mapped;
/// when fewer than one lookup in eight finds its value in the first 1,024 (a key, a transaction's
/// time), the memo stops for the rest of the array. The text parsers cost about what a lookup costs
/// and do without it.
struct ViewMemo<T> {
    slots: Vec<Option<(u128, Option<T>)>>,
    lookups: u32,
    hits: u32,
    on: bool,
}

impl<T: Clone> ViewMemo<T> {
    /// The table's size is `1 << SLOT_BITS`.
    const SLOT_BITS: u32 = 8;
    /// Lookups before the memo decides whether it pays, and the hits it needs by then.
    const TRIAL: u32 = 1024;
    const TRIAL_HITS: u32 = Self::TRIAL / 8;

    fn new() -> ViewMemo<T> {
        ViewMemo {
            slots: vec![None; 1 << Self::SLOT_BITS],
            lookups: 0,
            hits: 0,
            on: true,
        }
    }

    /// The result for the value of `view`: remembered, or `parse()` (then remembered).
    fn get_or(&mut self, view: u128, parse: impl FnOnce() -> Option<T>) -> Option<T> {
        if !self.on {
            return parse();
        }
        let folded = (view as u64) ^ ((view >> 64) as u64);
        // The top SLOT_BITS bits of the product: an index within the table.
        let slot = (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - Self::SLOT_BITS)) as usize;
        self.lookups += 1;
        if self.lookups == Self::TRIAL && self.hits < Self::TRIAL_HITS {
            self.on = false;
        }
        if let Some((seen, result)) = &self.slots[slot]
            && *seen == view
        {
            self.hits += 1;
            return result.clone();
        }
        let result = parse();
        self.slots[slot] = Some((view, result.clone()));
        result
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

    /// Values repeated as a Parquet dictionary gives them (one view per distinct value), short ones
    /// held in their views, long ones equal in content but at other offsets, NULLs, and a slice: every
    /// parser gives through the memo what it gives without it, value by value.
    #[test]
    fn the_view_memo_gives_what_parsing_each_value_gives() {
        use datafusion::arrow::array::StringViewBuilder;
        // Two timestamps of one length and one prefix (a view's first half), then other values.
        let distinct = [
            "2010-01-01 00:01:00",
            "2010-01-01 00:02:00",
            "Swipe Transaction",
            "Online Transaction",
            "$-77.00",
            "58523.0",
            "4344 6760 3124 1102",
            "not a value anything parses",
        ];
        let mut shared = StringViewBuilder::new().with_deduplicate_strings();
        let mut copied = StringViewBuilder::new();
        let mut plain = Vec::new();
        let mut state = 7u64;
        for row in 0..5_000usize {
            // Values in no order (a linear congruential sequence), with runs now and then.
            if row % 5 != 0 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
            }
            let pick = (state >> 33) as usize % distinct.len();
            let value = (row % 11 != 0).then(|| distinct[pick]);
            shared.append_option(value);
            copied.append_option(value);
            plain.push(value);
        }
        let shared: ArrayRef = Arc::new(shared.finish());
        let copied: ArrayRef = Arc::new(copied.finish());
        let plain: ArrayRef = Arc::new(StringArray::from(plain));
        for parser in Parser::ALL {
            let expected = parser.apply(&plain).unwrap();
            assert_eq!(
                &parser.apply(&shared).unwrap(),
                &expected,
                "{}",
                parser.name()
            );
            assert_eq!(
                &parser.apply(&copied).unwrap(),
                &expected,
                "{}",
                parser.name()
            );
            assert_eq!(
                &parser.apply(&shared.slice(17, 3_000)).unwrap(),
                &expected.slice(17, 3_000),
                "{}",
                parser.name()
            );
        }
    }

    /// The memo finds values it has seen, tells apart values whose views differ, and stops after its
    /// trial when values seldom repeat.
    #[test]
    fn the_view_memo_stops_where_values_do_not_repeat() {
        let mut parses = 0;
        let mut memo = ViewMemo::<u32>::new();
        for round in 0..3u128 {
            for view in 0..10u128 {
                let got = memo.get_or(view << 32 | 5, || {
                    parses += 1;
                    Some(view as u32 + 1)
                });
                assert_eq!(got, Some(view as u32 + 1), "round {round}");
            }
        }
        assert_eq!(parses, 10);
        assert!(memo.on);
        let mut unique = ViewMemo::<u32>::new();
        for view in 0..(ViewMemo::<u32>::TRIAL as u128 + 10) {
            assert_eq!(unique.get_or(view, || Some(view as u32)), Some(view as u32));
        }
        assert!(!unique.on);
        assert_eq!(unique.hits, 0);
    }
}
