//! Integer keys held more than once, found without a hash table: `count_repeated(key) -> BIGINT` (the
//! number of distinct non-NULL values that occur more than once; 0 means the column is unique), and
//! [`repeated_keys`], which the cdc write uses to find the keys a batch changes more than once.
//!
//! A `GROUP BY key HAVING COUNT(*) > 1` over 10M keys builds a hash table of 10M groups: about a second
//! on two cores. Keys of one table are mostly dense (ids handed out in order), so two bitsets over the
//! keys' range (seen once, seen again) answer the same question in one pass over the values, at a bit
//! per possible key; keys too sparse for that (the range over 64 times their count) are sorted instead.

use std::sync::Arc;

use datafusion::{
    arrow::{
        array::{Array, ArrayRef, AsArray, Int64Array, ListArray},
        buffer::OffsetBuffer,
        datatypes::{DataType, Field, FieldRef, Int64Type},
    },
    common::{DataFusionError, Result, ScalarValue},
    logical_expr::{
        Accumulator, AggregateUDF, AggregateUDFImpl, Signature, TypeSignature, Volatility,
        function::{AccumulatorArgs, StateFieldsArgs},
    },
};

/// Bits of bitset allowed per key before the keys count as sparse and are sorted instead (64 bits is
/// the 8 bytes the key itself takes).
const BITS_PER_KEY: u128 = 64;

/// The values that occur more than once in `keys`, each once, in ascending order.
pub fn repeated_keys(mut keys: Vec<i64>) -> Vec<i64> {
    let (Some(&low), Some(&high)) = (keys.iter().min(), keys.iter().max()) else {
        return Vec::new();
    };
    // Both bounds are i64, so the span fits in u64 and the bitset index below in usize (checked).
    let span = (i128::from(high) - i128::from(low)) as u128 + 1;
    let dense = span <= BITS_PER_KEY * keys.len() as u128 && usize::try_from(span).is_ok();
    if !dense {
        keys.sort_unstable();
        let mut repeated: Vec<i64> = keys
            .windows(2)
            .filter(|pair| pair[0] == pair[1])
            .map(|pair| pair[0])
            .collect();
        repeated.dedup();
        return repeated;
    }
    let words = (span as usize).div_ceil(64);
    let mut seen = vec![0u64; words];
    let mut again = vec![0u64; words];
    for key in keys {
        // In range: low <= key <= high, and span fits in usize.
        let offset = (i128::from(key) - i128::from(low)) as usize;
        let (word, bit) = (offset / 64, 1u64 << (offset % 64));
        again[word] |= seen[word] & bit;
        seen[word] |= bit;
    }
    let mut repeated = Vec::new();
    for (word, mut bits) in again.into_iter().enumerate() {
        while bits != 0 {
            let bit = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            repeated.push((i128::from(low) + (word * 64 + bit) as i128) as i64);
        }
    }
    repeated
}

/// The types [`append_keys`] and `count_repeated` take: integers that fit in an i64.
const INTEGER_TYPES: [DataType; 7] = [
    DataType::Int8,
    DataType::Int16,
    DataType::Int32,
    DataType::Int64,
    DataType::UInt8,
    DataType::UInt16,
    DataType::UInt32,
];

/// Whether values of this type fit in an i64: [`append_keys`] and `COUNT(DISTINCT)` per group
/// (the `distinct` module) take them.
pub fn is_integer_key(data_type: &DataType) -> bool {
    INTEGER_TYPES.contains(data_type)
}

/// Appends the non-NULL values of an integer array ([`is_integer_key`]) to `keys`.
pub fn append_keys(keys: &mut Vec<i64>, values: &ArrayRef) -> Result<()> {
    let values = datafusion::arrow::compute::cast(values, &DataType::Int64)?;
    let values = values.as_primitive::<Int64Type>();
    if values.null_count() == 0 {
        keys.extend_from_slice(values.values());
    } else {
        keys.extend(values.iter().flatten());
    }
    Ok(())
}

/// The `count_repeated` aggregate function.
pub fn count_repeated() -> AggregateUDF {
    AggregateUDF::from(CountRepeated {
        signature: Signature::one_of(
            INTEGER_TYPES
                .into_iter()
                .map(|t| TypeSignature::Exact(vec![t]))
                .collect(),
            Volatility::Immutable,
        ),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct CountRepeated {
    signature: Signature,
}

impl AggregateUDFImpl for CountRepeated {
    fn name(&self) -> &str {
        "count_repeated"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(KeysAccumulator::default()))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new_list(
            format!("{}[keys]", args.name),
            Field::new_list_field(DataType::Int64, false),
            true,
        ))])
    }
}

/// Every non-NULL key of its partition; the repeated ones are found when the result is asked for.
#[derive(Debug, Default)]
struct KeysAccumulator {
    keys: Vec<i64>,
}

impl Accumulator for KeysAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [values] = values else {
            return Err(DataFusionError::Execution(
                "count_repeated takes exactly one argument".into(),
            ));
        };
        append_keys(&mut self.keys, values)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [lists] = states else {
            return Err(DataFusionError::Internal(
                "count_repeated has one state column".into(),
            ));
        };
        let lists = lists.as_list::<i32>();
        for list in lists.iter().flatten() {
            append_keys(&mut self.keys, &list)?;
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let keys = Int64Array::from(std::mem::take(&mut self.keys));
        let list = ListArray::try_new(
            Arc::new(Field::new_list_field(DataType::Int64, false)),
            OffsetBuffer::from_lengths([keys.len()]),
            Arc::new(keys),
            None,
        )?;
        Ok(vec![ScalarValue::List(Arc::new(list))])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let repeated = repeated_keys(std::mem::take(&mut self.keys));
        Ok(ScalarValue::Int64(Some(repeated.len() as i64)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.keys.capacity() * std::mem::size_of::<i64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    /// What `GROUP BY key HAVING COUNT(*) > 1` answers, by a map.
    fn by_counting(keys: &[i64]) -> Vec<i64> {
        let mut counts = std::collections::BTreeMap::new();
        for k in keys {
            *counts.entry(*k).or_insert(0) += 1;
        }
        counts
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn dense_and_sparse_keys_give_the_values_held_more_than_once() {
        let dense: Vec<i64> = (0..10_000).chain([5, 5, 9_999, 0, 77]).collect();
        let sparse: Vec<i64> = vec![i64::MIN, i64::MAX, 3, i64::MAX, -8, 3, 3, i64::MIN];
        let negative: Vec<i64> = (-500..-400).chain([-450, -401]).collect();
        for keys in [dense, sparse, negative, vec![], vec![42], vec![42, 42]] {
            assert_eq!(repeated_keys(keys.clone()), by_counting(&keys), "{keys:?}");
        }
        assert_eq!(
            repeated_keys(vec![i64::MAX, i64::MIN, i64::MAX]),
            [i64::MAX]
        );
    }

    proptest::proptest! {
        #[test]
        fn any_keys_give_what_a_count_per_key_gives(
            keys in proptest::collection::vec(-300i64..300, 0..400),
            far in proptest::collection::vec(proptest::num::i64::ANY, 0..20),
        ) {
            proptest::prop_assert_eq!(repeated_keys(keys.clone()), by_counting(&keys));
            let mixed: Vec<i64> = keys.iter().chain(&far).copied().collect();
            proptest::prop_assert_eq!(repeated_keys(mixed.clone()), by_counting(&mixed));
        }
    }

    #[tokio::test]
    async fn count_repeated_over_partitions_matches_a_group_by() {
        let ctx = SessionContext::new_with_config(
            datafusion::prelude::SessionConfig::new().with_target_partitions(4),
        );
        ctx.register_udaf(count_repeated());
        // Repeats within one partition, across partitions, NULLs (not counted), and an INT column.
        let values =
            "(VALUES (1), (2), (2), (3), (NULL), (NULL), (7), (7), (7), (1000000)) AS t(k)";
        for sql in [
            format!("SELECT count_repeated(k) FROM {values}"),
            format!("SELECT count_repeated(k32) FROM (SELECT CAST(k AS INT) AS k32 FROM {values})"),
        ] {
            let out = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
            assert_eq!(
                out[0].column(0).as_primitive::<Int64Type>().value(0),
                2,
                "{sql}"
            );
        }

        let keys = Int64Array::from_iter((0..50_000i64).map(|k| Some(k % 40_000)));
        let batches: Vec<_> = (0..4)
            .map(|p| {
                let slice = keys.slice(p * 12_500, 12_500);
                datafusion::arrow::record_batch::RecordBatch::try_from_iter([(
                    "k",
                    Arc::new(slice) as ArrayRef,
                )])
                .unwrap()
            })
            .collect();
        let schema = batches[0].schema();
        let table = datafusion::datasource::MemTable::try_new(
            schema,
            batches.into_iter().map(|b| vec![b]).collect(),
        )
        .unwrap();
        ctx.register_table("keys", Arc::new(table)).unwrap();
        let first = |sql: &'static str| {
            let ctx = ctx.clone();
            async move {
                let out = ctx.sql(sql).await.unwrap().collect().await.unwrap();
                out[0].column(0).as_primitive::<Int64Type>().value(0)
            }
        };
        let ours = first("SELECT count_repeated(k) FROM keys").await;
        let grouped =
            first("SELECT COUNT(*) FROM (SELECT k FROM keys GROUP BY k HAVING COUNT(*) > 1)").await;
        assert_eq!(ours, 10_000);
        assert_eq!(ours, grouped);
    }
}
