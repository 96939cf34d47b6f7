//! `TRIM(x)` (DataFusion's `btrim`, alias `trim`) that hands a column back as it is when none of its
//! values starts or ends with a space. DataFusion's builds a new array value by value whatever the
//! values (for string views: a view made again for each, with a null bit), which in the reference
//! Silver stage's three `NULLIF(TRIM(...), '')` took 3% of its CPU over clean data; checking the first
//! and last byte of each value costs a tenth of that. Any other call (characters to trim, a value that
//! needs trimming, other types) goes to DataFusion's function.

use std::sync::Arc;

use datafusion::{
    arrow::{
        array::{Array, ArrayRef, AsArray, StringViewArray},
        datatypes::DataType,
    },
    common::Result,
    logical_expr::{
        ColumnarValue, Documentation, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    },
};

/// `btrim` (and `trim`), as DataFusion's with the shortcut above.
pub fn trim() -> ScalarUDF {
    ScalarUDF::from(Trim {
        inner: datafusion::functions::string::btrim(),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Trim {
    /// DataFusion's `btrim`: its name, signature and documentation, and every call the shortcut skips.
    inner: Arc<ScalarUDF>,
}

impl ScalarUDFImpl for Trim {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if let [ColumnarValue::Array(array)] = args.args.as_slice()
            && nothing_to_trim(array)
        {
            return Ok(ColumnarValue::Array(array.clone()));
        }
        self.inner.invoke_with_args(args)
    }
}

/// Whether no value of `array` (a string or string view column) starts or ends with a space, the only
/// character `TRIM(x)` removes; `false` for other types.
fn nothing_to_trim(array: &ArrayRef) -> bool {
    let clean = |value: &[u8]| value.first() != Some(&b' ') && value.last() != Some(&b' ');
    let valid = |row: usize| array.nulls().is_none_or(|n| n.is_valid(row));
    match array.data_type() {
        DataType::Utf8View => {
            let views = array.as_string_view();
            (0..views.len()).all(|row| !valid(row) || view_is_clean(views, row))
        }
        DataType::Utf8 => {
            let strings = array.as_string::<i32>();
            (0..strings.len()).all(|row| !valid(row) || clean(strings.value(row).as_bytes()))
        }
        _ => false,
    }
}

/// Whether value `row` of `views` neither starts nor ends with a space, read from its view (the first
/// byte is inline or the prefix's first) and, for a value longer than 12 bytes, its last byte in the
/// data buffer.
fn view_is_clean(views: &StringViewArray, row: usize) -> bool {
    let view = views.views()[row];
    let length = view as u32 as usize;
    if length == 0 {
        return true;
    }
    // Bytes 4..8 of a view: the value's start (inline) or its prefix, both its first bytes.
    let first = (view >> 32) as u8;
    let last = if length <= 12 {
        (view >> (32 + 8 * (length - 1))) as u8
    } else {
        let buffer = (view >> 64) as u32 as usize;
        let offset = (view >> 96) as u32 as usize;
        match views
            .data_buffers()
            .get(buffer)
            .and_then(|b| b.get(offset + length - 1))
        {
            Some(&byte) => byte,
            // Not where the view says (a malformed array): DataFusion's function decides.
            None => b' ',
        }
    };
    first != b' ' && last != b' '
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::{
        arrow::{array::StringArray, datatypes::Field},
        common::tree_node::TreeNode,
        config::ConfigOptions,
    };

    /// `TRIM` of `array` by `function`.
    fn apply(function: &ScalarUDF, array: ArrayRef) -> ArrayRef {
        let field = Arc::new(Field::new("x", array.data_type().clone(), true));
        let args = ScalarFunctionArgs {
            number_rows: array.len(),
            return_field: field.clone(),
            arg_fields: vec![field],
            args: vec![ColumnarValue::Array(array)],
            config_options: Arc::new(ConfigOptions::default()),
        };
        match function.invoke_with_args(args).unwrap() {
            ColumnarValue::Array(array) => array,
            ColumnarValue::Scalar(_) => panic!("an array in, an array out"),
        }
    }

    #[test]
    fn trims_as_datafusion_does_and_hands_clean_columns_back_unchanged() {
        let ours = trim();
        let theirs = datafusion::functions::string::btrim();
        let long = "a value longer than twelve bytes";
        let clean = vec![
            Some("Reno"),
            None,
            Some(""),
            Some(long),
            Some("x y"),
            Some("12 bytes ok!"),
        ];
        let cases: Vec<Vec<Option<&str>>> = vec![
            clean.clone(),
            // A space at either end, inline or in a data buffer, or a value of spaces.
            [clean.clone(), vec![Some(" Reno")]].concat(),
            [clean.clone(), vec![Some("Reno ")]].concat(),
            [
                clean.clone(),
                vec![Some("a value longer than twelve bytes ")],
            ]
            .concat(),
            [
                clean.clone(),
                vec![Some(" a value longer than twelve bytes")],
            ]
            .concat(),
            [clean.clone(), vec![Some("   ")]].concat(),
            // A tab is not trimmed.
            [clean.clone(), vec![Some("\tReno\t")]].concat(),
        ];
        for (index, values) in cases.iter().enumerate() {
            let arrays: [ArrayRef; 2] = [
                Arc::new(StringViewArray::from(values.clone())),
                Arc::new(StringArray::from(values.clone())),
            ];
            for array in arrays {
                let trimmed = apply(&ours, array.clone());
                assert_eq!(
                    trimmed.as_ref(),
                    apply(&theirs, array.clone()).as_ref(),
                    "case {index}, {}",
                    array.data_type()
                );
                // Only the clean ones (and the tabs) come back as they were, without a copy.
                let unchanged = index == 0 || index == 6;
                assert_eq!(
                    trimmed.to_data().ptr_eq(&array.to_data()),
                    unchanged,
                    "case {index}, {}",
                    array.data_type()
                );
            }
        }
    }

    #[tokio::test]
    async fn sql_trim_is_the_shortcut() {
        let ctx = datafusion::prelude::SessionContext::new();
        super::super::register_all(&ctx);
        let rows = ctx
            .sql(
                "SELECT TRIM(x) AS t, btrim(x) AS b, TRIM(BOTH '-' FROM y) AS c \
                 FROM (VALUES (' a ', '-b-'), ('c', 'd')) AS v(x, y) ORDER BY t",
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(
            datafusion::arrow::util::pretty::pretty_format_batches(&rows)
                .unwrap()
                .to_string(),
            "+---+---+---+\n| t | b | c |\n+---+---+---+\n| a | a | b |\n| c | c | d |\n+---+---+---+"
        );
        // The plan of `TRIM(x)` and `btrim(x)` calls this function, not DataFusion's.
        let plan = ctx
            .sql("SELECT TRIM(x) AS a, btrim(x) AS b FROM (VALUES ('a')) AS v(x)")
            .await
            .unwrap()
            .into_unoptimized_plan();
        let mut calls = Vec::new();
        for expr in plan.expressions() {
            let _ = expr.apply(|e| {
                if let datafusion::logical_expr::Expr::ScalarFunction(call) = e {
                    let inner: &dyn std::any::Any = call.func.inner().as_ref();
                    calls.push(inner.downcast_ref::<Trim>().is_some());
                }
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            });
        }
        assert_eq!(calls, vec![true, true]);
    }
}
