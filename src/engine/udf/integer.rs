//! `TRY_CAST(text AS BIGINT)` and `TRY_CAST(text AS INT)` parsed in one pass over the values. Arrow's
//! cast (which DataFusion's `TRY_CAST` calls) parses each string through a generic iterator of
//! options, a value at a time: in the reference Silver stage, whose five id columns are such casts,
//! 5–6% of the stage's CPU. [`IntegerText`] rewrites each such cast, once the plan is optimized, into a
//! call of [`ParseInteger`], with arrow's results: ASCII whitespace at either end ignored, an optional
//! sign, then digits only; NULL for anything else, for a value out of the type's range, and for NULL.

use std::sync::Arc;

use datafusion::{
    arrow::{
        array::{Array, ArrayRef, AsArray, PrimitiveArray, StringArrayType},
        buffer::{NullBuffer, ScalarBuffer},
        datatypes::{ArrowPrimitiveType, DataType, Field, FieldRef, Int32Type, Int64Type},
    },
    common::{
        DFSchema, DataFusionError, Result,
        tree_node::{Transformed, TreeNode},
    },
    logical_expr::{
        ColumnarValue, Expr, ExprSchemable, LogicalPlan, ReturnFieldArgs, ScalarFunctionArgs,
        ScalarUDF, ScalarUDFImpl, Signature, TryCast, Volatility, expr::ScalarFunction,
        expr_rewriter::NamePreserver,
    },
    optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule},
};

/// The optimizer rule: every `TRY_CAST(x AS BIGINT)` or `TRY_CAST(x AS INT)` of a string `x` becomes a
/// [`ParseInteger`] call. Any other cast is left to DataFusion.
#[derive(Debug, Default)]
pub struct IntegerText;

impl OptimizerRule for IntegerText {
    fn name(&self) -> &str {
        "medallion_integer_text"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        // The expressions of a node read its one input's columns; a join's read two, and are left.
        let inputs = plan.inputs();
        let [input] = inputs.as_slice() else {
            return Ok(Transformed::no(plan));
        };
        let schema = Arc::clone(input.schema());
        drop(inputs);
        let names = NamePreserver::new(&plan);
        plan.map_expressions(|expr| {
            // A grouping set's name is its sets': an alias around it would make it a plain expression.
            if matches!(expr, Expr::GroupingSet(_)) {
                return Ok(Transformed::no(expr));
            }
            let name = names.save(&expr);
            expr.transform_up(|e| rewrite(e, &schema))
                .map(|rewritten| rewritten.update_data(|e| name.restore(e)))
        })
    }
}

/// `expr` as a [`ParseInteger`] call when it is a `TRY_CAST` of a string to a 64- or 32-bit integer.
fn rewrite(expr: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    let Expr::TryCast(TryCast { expr: value, field }) = &expr else {
        return Ok(Transformed::no(expr));
    };
    let target = match field.data_type() {
        DataType::Int64 | DataType::Int32 => field.data_type().clone(),
        _ => return Ok(Transformed::no(expr)),
    };
    let is_text = matches!(
        value.get_type(schema),
        Ok(DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8)
    );
    if !is_text {
        return Ok(Transformed::no(expr));
    }
    let call = Expr::ScalarFunction(ScalarFunction::new_udf(
        Arc::new(ScalarUDF::new_from_impl(ParseInteger::new(target))),
        vec![value.as_ref().clone()],
    ));
    Ok(Transformed::yes(call))
}

/// `TRY_CAST` of a string to `target` (Int64 or Int32), as [`IntegerText`] rewrites it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ParseInteger {
    target: DataType,
    signature: Signature,
}

impl ParseInteger {
    fn new(target: DataType) -> ParseInteger {
        ParseInteger {
            target,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for ParseInteger {
    fn name(&self) -> &str {
        match self.target {
            DataType::Int32 => "try_cast_int",
            _ => "try_cast_bigint",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(self.target.clone())
    }

    /// Nullable, as `TRY_CAST` is.
    fn return_field_from_args(&self, _args: ReturnFieldArgs) -> Result<FieldRef> {
        Ok(Arc::new(Field::new(self.name(), self.target.clone(), true)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [value] = args.args.as_slice() else {
            return Err(DataFusionError::Execution(format!(
                "{} takes exactly one argument",
                self.name()
            )));
        };
        let scalar = matches!(value, ColumnarValue::Scalar(_));
        let array = value.to_array(if scalar { 1 } else { args.number_rows })?;
        let parsed = match self.target {
            DataType::Int32 => parse_array::<Int32Type>(&array)?,
            _ => parse_array::<Int64Type>(&array)?,
        };
        if scalar {
            return datafusion::common::ScalarValue::try_from_array(&parsed, 0)
                .map(ColumnarValue::Scalar);
        }
        Ok(ColumnarValue::Array(parsed))
    }
}

/// The integers of a string array ([`parse`] each), of type `T`; another type goes to arrow's cast.
fn parse_array<T>(array: &ArrayRef) -> Result<ArrayRef>
where
    T: ArrowPrimitiveType,
    T::Native: TryFrom<i64>,
{
    Ok(match array.data_type() {
        DataType::Utf8 => parse_strings::<T, _>(array.as_string::<i32>()),
        DataType::LargeUtf8 => parse_strings::<T, _>(array.as_string::<i64>()),
        DataType::Utf8View => parse_strings::<T, _>(array.as_string_view()),
        _ => {
            let options = datafusion::arrow::compute::CastOptions {
                safe: true,
                ..Default::default()
            };
            datafusion::arrow::compute::cast_with_options(array, &T::DATA_TYPE, &options)?
        }
    })
}

fn parse_strings<'a, T, S>(strings: S) -> ArrayRef
where
    T: ArrowPrimitiveType,
    T::Native: TryFrom<i64>,
    S: StringArrayType<'a> + Array,
{
    let rows = strings.len();
    let mut values: Vec<T::Native> = Vec::with_capacity(rows);
    let mut valid: Vec<bool> = Vec::with_capacity(rows);
    let mut any_null = false;
    for row in 0..rows {
        let parsed = match strings.is_valid(row) {
            true => parse(strings.value(row).as_bytes()).and_then(|n| T::Native::try_from(n).ok()),
            false => None,
        };
        any_null |= parsed.is_none();
        valid.push(parsed.is_some());
        values.push(parsed.unwrap_or_default());
    }
    let nulls = any_null.then(|| NullBuffer::from(valid));
    Arc::new(PrimitiveArray::<T>::new(ScalarBuffer::from(values), nulls))
}

/// The integer `text` spells as arrow's cast reads it: ASCII whitespace at either end ignored, an
/// optional `+` or `-`, then one digit or more and nothing else, within an i64.
fn parse(text: &[u8]) -> Option<i64> {
    let text = text.trim_ascii();
    let (negative, digits) = match text.split_first()? {
        (b'-', rest) => (true, rest),
        (b'+', rest) => (false, rest),
        _ => (false, text),
    };
    if digits.is_empty() {
        return None;
    }
    // Negative values are summed below zero, so that i64::MIN fits.
    let mut value: i64 = 0;
    for &byte in digits {
        let digit = i64::from(byte.wrapping_sub(b'0'));
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?;
        value = match negative {
            true => value.checked_sub(digit)?,
            false => value.checked_add(digit)?,
        };
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::{
        arrow::{
            array::{LargeStringArray, StringArray, StringViewArray},
            compute::{CastOptions, cast_with_options},
        },
        prelude::SessionContext,
    };

    /// What arrow's cast (DataFusion's `TRY_CAST`) gives.
    fn by_arrow(array: &ArrayRef, target: &DataType) -> ArrayRef {
        let options = CastOptions {
            safe: true,
            ..Default::default()
        };
        cast_with_options(array, target, &options).expect("a safe cast")
    }

    fn texts() -> Vec<Option<String>> {
        [
            "0",
            "7",
            "-7",
            "+7",
            "007",
            " 12",
            "12 ",
            "\t12\n",
            " - 1",
            "-",
            "+",
            "",
            " ",
            "1 2",
            "1.0",
            "1e3",
            "0x10",
            "٣",
            "１",
            "12a",
            "a12",
            "--1",
            "+-1",
            "2147483647",
            "2147483648",
            "-2147483648",
            "-2147483649",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "99999999999999999999999",
            "123456789012345",
            "\u{b}5",
        ]
        .iter()
        .map(|t| Some(t.to_string()))
        .chain([None])
        .collect()
    }

    fn arrays(texts: &[Option<String>]) -> Vec<ArrayRef> {
        vec![
            Arc::new(StringArray::from(texts.to_vec())),
            Arc::new(LargeStringArray::from(texts.to_vec())),
            Arc::new(StringViewArray::from(texts.to_vec())),
        ]
    }

    #[test]
    fn integers_parse_as_arrows_cast_parses_them() {
        let texts = texts();
        for array in arrays(&texts) {
            for target in [DataType::Int64, DataType::Int32] {
                let parsed = match target {
                    DataType::Int32 => parse_array::<Int32Type>(&array),
                    _ => parse_array::<Int64Type>(&array),
                }
                .expect("parsed");
                assert_eq!(
                    &parsed,
                    &by_arrow(&array, &target),
                    "{} to {target}",
                    array.data_type()
                );
            }
        }
        // Clean ids have no NULL buffer.
        let clean: ArrayRef = Arc::new(StringViewArray::from(vec!["1", "22", "333"]));
        assert_eq!(
            parse_array::<Int64Type>(&clean)
                .expect("parsed")
                .null_count(),
            0
        );
        assert!(
            parse_array::<Int64Type>(&clean)
                .expect("parsed")
                .nulls()
                .is_none()
        );
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_as_arrows_cast_parses_it(
            texts in proptest::collection::vec(
                proptest::option::of("[ \\t+\\-0-9a]{0,22}"),
                0..40,
            ),
        ) {
            for array in arrays(&texts) {
                for target in [DataType::Int64, DataType::Int32] {
                    let parsed = match target {
                        DataType::Int32 => parse_array::<Int32Type>(&array),
                        _ => parse_array::<Int64Type>(&array),
                    }.expect("parsed");
                    proptest::prop_assert_eq!(&parsed, &by_arrow(&array, &target));
                }
            }
        }
    }

    /// `TRY_CAST` of a string to BIGINT or INT is planned as this function, with the cast's results
    /// and column names; other casts are not.
    #[tokio::test]
    async fn try_cast_of_text_to_integers_runs_this_function() {
        let ctx = SessionContext::new();
        crate::engine::udf::register_all(&ctx);
        let sql = "SELECT TRY_CAST(t AS BIGINT) AS b, TRY_CAST(t AS INT) AS i, TRY_CAST(t AS DOUBLE) AS d, \
                   TRY_CAST(n AS BIGINT) AS n \
                   FROM (VALUES ('12', 1), (' -3 ', 2), ('x', 3), (NULL, 4), ('3000000000', 5)) AS v(t, n)";
        let frame = ctx.sql(sql).await.expect("planned");
        let plan = format!(
            "{}",
            frame
                .clone()
                .into_optimized_plan()
                .expect("optimized")
                .display_indent()
        );
        assert!(
            plan.contains("try_cast_bigint(") && plan.contains("try_cast_int("),
            "{plan}"
        );
        assert!(
            plan.contains("TRY_CAST(") && !plan.contains("try_cast_double"),
            "{plan}"
        );
        let batches = frame.collect().await.expect("ran");
        let batch = datafusion::arrow::compute::concat_batches(&batches[0].schema(), &batches)
            .expect("one batch");
        let bigints: Vec<Option<i64>> =
            batch.column(0).as_primitive::<Int64Type>().iter().collect();
        let ints: Vec<Option<i32>> = batch.column(1).as_primitive::<Int32Type>().iter().collect();
        assert_eq!(
            bigints,
            [Some(12), Some(-3), None, None, Some(3_000_000_000)]
        );
        assert_eq!(ints, [Some(12), Some(-3), None, None, None]);
        let schema = batches[0].schema();
        assert_eq!(schema.field(0).data_type(), &DataType::Int64);
        assert_eq!(schema.field(1).data_type(), &DataType::Int32);
        assert!(schema.field(0).is_nullable());
    }
}
