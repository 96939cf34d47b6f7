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
        array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, ListArray},
        buffer::{OffsetBuffer, ScalarBuffer},
        datatypes::{DataType, Field, FieldRef, Int64Type},
    },
    common::{DataFusionError, Result, ScalarValue},
    logical_expr::{
        Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, ScalarFunctionArgs, ScalarUDF,
        ScalarUDFImpl, Signature, TypeSignature, Volatility,
        function::{AccumulatorArgs, StateFieldsArgs},
    },
};

/// Bits of bitset allowed per key before the keys count as sparse and are sorted instead (64 bits is
/// the 8 bytes the key itself takes).
const BITS_PER_KEY: u128 = 64;

/// Keys as gathered from one array: its values when it held no NULL (shared, not copied), its non-NULL
/// values otherwise.
type Part = ScalarBuffer<i64>;

/// The values that occur more than once in `keys`, each once, in ascending order.
pub fn repeated_keys(keys: Vec<i64>) -> Vec<i64> {
    let parts = vec![Part::from(keys)];
    let bounds = bounds_of(&parts);
    repeated_in(parts, bounds)
}

/// [`repeated_keys`] of `parts` taken together, whose least and greatest values are `bounds`.
fn repeated_in(parts: Vec<Part>, bounds: Option<(i64, i64)>) -> Vec<i64> {
    let Some((low, high)) = bounds else {
        return Vec::new();
    };
    let rows = parts.iter().map(|part| part.len()).sum();
    if let Some(bits) = KeyBits::new(low, high, rows) {
        return filled(bits, &parts).repeated_values();
    }
    // One list to sort, each part freed as it is copied.
    let mut keys = Vec::with_capacity(rows);
    for part in parts {
        keys.extend_from_slice(&part);
    }
    keys.sort_unstable();
    let mut repeated: Vec<i64> = keys
        .windows(2)
        .filter(|pair| pair[0] == pair[1])
        .map(|pair| pair[0])
        .collect();
    repeated.dedup();
    repeated
}

/// The least and greatest of `parts`' values, in one pass.
fn bounds_of(parts: &[Part]) -> Option<(i64, i64)> {
    parts
        .iter()
        .flat_map(|part| part.iter())
        .fold(None, |bounds, &key| wider(bounds, Some((key, key))))
}

/// Bounds that hold both `a` and `b`.
fn wider(a: Option<(i64, i64)>, b: Option<(i64, i64)>) -> Option<(i64, i64)> {
    match (a, b) {
        (Some((low, high)), Some((l, h))) => Some((low.min(l), high.max(h))),
        (bounds, None) | (None, bounds) => bounds,
    }
}

/// Keys at which [`filled`] fills bitsets on several threads: below it, starting them costs more than
/// it saves.
const PARALLEL_KEYS: usize = 1 << 20;

/// `bits` with the keys of `parts` added (not counted as rows). Many keys are split among the machine's
/// cores, each filling bitsets of its own over the same bounds, merged after (at 10M keys a pass takes
/// about a tenth of a second), when those bitsets are small next to the keys: at most 2 bytes a key
/// for the pair (the range at most 8 times the keys), so that the copies add a quarter of the keys'
/// memory at most. A thread that cannot be started leaves its share to this one.
fn filled(mut bits: KeyBits, parts: &[Part]) -> KeyBits {
    let total: usize = parts.iter().map(|part| part.len()).sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let small = bits.seen.len().saturating_mul(16) <= total.saturating_mul(2);
    if total < PARALLEL_KEYS || cores < 2 || !small {
        parts
            .iter()
            .flat_map(|part| part.iter())
            .for_each(|&key| bits.insert(key));
        return bits;
    }
    // At most `cores` shares of about equal size, cut across the parts.
    let share = total.div_ceil(cores);
    let mut shares: Vec<Vec<&[i64]>> = vec![Vec::new()];
    let mut room = share;
    for part in parts {
        let mut rest: &[i64] = part;
        while !rest.is_empty() {
            if room == 0 {
                shares.push(Vec::new());
                room = share;
            }
            let (taken, left) = rest.split_at(rest.len().min(room));
            room -= taken.len();
            rest = left;
            if let Some(current) = shares.last_mut() {
                current.push(taken);
            }
        }
    }
    let fill = |template: &KeyBits, share: &[&[i64]]| {
        let mut own = template.clone();
        share
            .iter()
            .copied()
            .flatten()
            .for_each(|&key| own.insert(key));
        own
    };
    let template = &bits;
    let filled: Vec<KeyBits> = std::thread::scope(|scope| {
        let workers: Vec<_> = shares
            .iter()
            .map(|share| {
                let started =
                    std::thread::Builder::new().spawn_scoped(scope, move || fill(template, share));
                (share, started)
            })
            .collect();
        workers
            .into_iter()
            .map(|(share, started)| match started {
                Ok(worker) => match worker.join() {
                    Ok(own) => own,
                    // `insert` checks its bounds and does not panic; were it to, the panic goes on.
                    Err(panic) => std::panic::resume_unwind(panic),
                },
                Err(_) => fill(template, share),
            })
            .collect()
    });
    for own in &filled {
        bits.merge(own);
    }
    bits
}

/// Integer keys within bounds known beforehand, gathered as they come into two bitsets over the
/// bounds' range (seen once, seen again): a bit per possible key where a list of them takes 64. The
/// bitsets end on a whole word, so a key up to 63 past the greatest bound still counts as within.
#[derive(Debug, Clone)]
pub struct KeyBits {
    low: i64,
    seen: Vec<u64>,
    again: Vec<u64>,
    /// Keys gathered, NULLs included.
    rows: usize,
    nulls: usize,
    /// Whether a key fell outside the bounds: which keys are repeated is then unknown.
    outside: bool,
}

impl KeyBits {
    /// Bitsets for keys from `low` to `high`, when `rows` keys are dense enough in that range (the
    /// range at most [`BITS_PER_KEY`] times their count); `None` otherwise.
    pub fn new(low: i64, high: i64, rows: usize) -> Option<KeyBits> {
        let words = KeyBits::span(low, high, rows)?.div_ceil(64);
        let mut bits = KeyBits::empty(low);
        bits.seen = vec![0; words];
        bits.again = vec![0; words];
        Some(bits)
    }

    /// Whether `rows` keys from `low` to `high` are dense enough for bitsets ([`KeyBits::new`]).
    pub fn fits(low: i64, high: i64, rows: usize) -> bool {
        KeyBits::span(low, high, rows).is_some()
    }

    /// The keys from `low` to `high`, when `rows` keys are dense enough in them for bitsets.
    fn span(low: i64, high: i64, rows: usize) -> Option<usize> {
        // Both bounds are i64, so the span fits in i128; the words must be addressable.
        let span = i128::from(high) - i128::from(low) + 1;
        let dense = span >= 1 && span as u128 <= BITS_PER_KEY * rows.max(1) as u128;
        dense.then(|| usize::try_from(span).ok()).flatten()
    }

    /// Bitsets of no range: every key falls outside.
    fn empty(low: i64) -> KeyBits {
        KeyBits {
            low,
            seen: Vec::new(),
            again: Vec::new(),
            rows: 0,
            nulls: 0,
            outside: false,
        }
    }

    fn insert(&mut self, key: i64) {
        let offset = i128::from(key) - i128::from(self.low);
        match usize::try_from(offset)
            .ok()
            .filter(|o| o / 64 < self.seen.len())
        {
            Some(offset) => {
                let (word, bit) = (offset / 64, 1u64 << (offset % 64));
                self.again[word] |= self.seen[word] & bit;
                self.seen[word] |= bit;
            }
            None => self.outside = true,
        }
    }

    /// Adds the keys of an integer array ([`is_integer_key`]).
    pub fn append(&mut self, array: &ArrayRef) -> Result<()> {
        let values = datafusion::arrow::compute::cast(array, &DataType::Int64)?;
        let values = values.as_primitive::<Int64Type>();
        self.rows += values.len();
        self.nulls += values.null_count();
        if values.null_count() == 0 {
            values.values().iter().for_each(|&key| self.insert(key));
        } else {
            values.iter().flatten().for_each(|key| self.insert(key));
        }
        Ok(())
    }

    /// Adds the keys `other` gathered; bitsets over other bounds count as keys outside.
    pub fn merge(&mut self, other: &KeyBits) {
        self.rows += other.rows;
        self.nulls += other.nulls;
        self.outside |= other.outside;
        if (self.low, self.seen.len()) != (other.low, other.seen.len()) {
            self.outside = true;
            return;
        }
        for (word, (seen, again)) in other.seen.iter().zip(&other.again).enumerate() {
            self.again[word] |= again | (self.seen[word] & seen);
            self.seen[word] |= seen;
        }
    }

    /// Keys gathered, NULLs included.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether `key` was gathered.
    pub fn contains(&self, key: i64) -> bool {
        let offset = i128::from(key) - i128::from(self.low);
        usize::try_from(offset)
            .ok()
            .and_then(|o| {
                self.seen
                    .get(o / 64)
                    .map(|word| word & (1u64 << (o % 64)) != 0)
            })
            .unwrap_or(false)
    }

    /// Whether a key from `low` to `high` (both included) was gathered.
    pub fn any_within(&self, low: i64, high: i64) -> bool {
        let bits = self.seen.len() as i128 * 64;
        let from = (i128::from(low) - i128::from(self.low)).max(0);
        let to = (i128::from(high) - i128::from(self.low)).min(bits - 1);
        if from > to {
            return false;
        }
        // Both within the words, so addressable.
        let (from, to) = (from as usize, to as usize);
        (from / 64..=to / 64).any(|word| {
            let mut mask = u64::MAX;
            if word == from / 64 {
                mask &= u64::MAX << (from % 64);
            }
            if word == to / 64 {
                mask &= u64::MAX >> (63 - to % 64);
            }
            self.seen[word] & mask != 0
        })
    }

    /// The least and greatest non-NULL key gathered, unless one fell outside the bounds.
    pub fn bounds(&self) -> Option<(i64, i64)> {
        let first = self.seen.iter().position(|&w| w != 0)?;
        let last = self.seen.iter().rposition(|&w| w != 0)?;
        (!self.outside).then(|| {
            (
                self.key_at(first, self.seen[first].trailing_zeros()),
                self.key_at(last, 63 - self.seen[last].leading_zeros()),
            )
        })
    }

    /// How many values are held more than once (NULL counting as one value, as `GROUP BY` counts it),
    /// unless a key fell outside the bounds.
    pub fn repeated(&self) -> Option<u64> {
        let values: u64 = self.again.iter().map(|w| u64::from(w.count_ones())).sum();
        (!self.outside).then_some(values + u64::from(self.nulls > 1))
    }

    /// The key of `bit` in `word`: within the bounds, or past the greatest in the last word, where
    /// [`KeyBits::insert`] puts only keys that fit in an i64.
    fn key_at(&self, word: usize, bit: u32) -> i64 {
        (i128::from(self.low) + (word * 64) as i128 + i128::from(bit)) as i64
    }

    /// The non-NULL keys held more than once, in ascending order (those within the bounds).
    fn repeated_values(&self) -> Vec<i64> {
        let mut repeated = Vec::new();
        for (word, &bits) in self.again.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                repeated.push(self.key_at(word, bit));
            }
        }
        repeated
    }
}

/// The types [`key_part`] and `count_repeated` take: integers that fit in an i64.
const INTEGER_TYPES: [DataType; 7] = [
    DataType::Int8,
    DataType::Int16,
    DataType::Int32,
    DataType::Int64,
    DataType::UInt8,
    DataType::UInt16,
    DataType::UInt32,
];

/// Whether values of this type fit in an i64: [`key_part`] and `COUNT(DISTINCT)` per group
/// (the `distinct` module) take them.
pub fn is_integer_key(data_type: &DataType) -> bool {
    INTEGER_TYPES.contains(data_type)
}

/// The non-NULL values of an integer array ([`is_integer_key`]) as a [`Part`]: the array's own values
/// when it holds no NULL, is of 64 bits and takes at least half of the memory it holds (a slice of a
/// larger batch is copied rather than keeping the batch alive; so is memory arrow does not own, such
/// as a mapped file). Gathering 10M keys into one growing list copied each key about twice and touched
/// twice their memory, page by page (a tenth of a first load's page faults).
fn key_part(values: &ArrayRef) -> Result<Part> {
    let values = datafusion::arrow::compute::cast(values, &DataType::Int64)?;
    let values = values.as_primitive::<Int64Type>();
    if values.null_count() == 0 {
        let own = values.values();
        let held = own.inner().capacity();
        if held > 0 && held <= 2 * std::mem::size_of_val(own.as_ref()) {
            return Ok(own.clone());
        }
        return Ok(Part::from(own.to_vec()));
    }
    let mut keys = Vec::with_capacity(values.len() - values.null_count());
    keys.extend(values.iter().flatten());
    Ok(Part::from(keys))
}

/// The keys of integer arrays ([`is_integer_key`]), gathered to find the repeated ones: the non-NULL
/// values, a part per array (see [`key_part`]), and how many were NULL.
#[derive(Debug, Default)]
pub struct Keys {
    parts: Vec<Part>,
    nulls: usize,
    /// Bytes of memory the parts hold (a shared buffer counted by each part that shares it).
    held: usize,
    /// The least and greatest non-NULL key, found as each part is added (by the task that gathers
    /// it) rather than in a pass of its own over every key.
    bounds: Option<(i64, i64)>,
}

impl Keys {
    /// Adds the keys of `array`.
    pub fn append(&mut self, array: &ArrayRef) -> Result<()> {
        self.nulls += array.null_count();
        let part = key_part(array)?;
        if !part.is_empty() {
            self.held += part.inner().capacity();
            self.bounds = wider(self.bounds, bounds_of(std::slice::from_ref(&part)));
            self.parts.push(part);
        }
        Ok(())
    }

    /// Adds the keys `other` gathered, as parts of their own (no copy).
    pub fn extend(&mut self, other: Keys) {
        self.parts.extend(other.parts);
        self.nulls += other.nulls;
        self.held += other.held;
        self.bounds = wider(self.bounds, other.bounds);
    }

    /// Keys gathered, NULLs included.
    pub fn len(&self) -> usize {
        self.non_null() + self.nulls
    }

    /// Whether no key was gathered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Non-NULL keys gathered.
    fn non_null(&self) -> usize {
        self.parts.iter().map(|part| part.len()).sum()
    }

    /// NULL keys gathered.
    pub fn nulls(&self) -> usize {
        self.nulls
    }

    /// The least and greatest non-NULL key.
    pub fn bounds(&self) -> Option<(i64, i64)> {
        self.bounds
    }

    /// The keys as bitsets over their bounds ([`KeyBits`]), when no key is NULL and they are dense
    /// enough for bitsets; `None` otherwise.
    pub fn into_bits(self) -> Option<KeyBits> {
        let (low, high) = self.bounds()?;
        if self.nulls > 0 {
            return None;
        }
        let rows = self.len();
        let mut bits = filled(KeyBits::new(low, high, rows)?, &self.parts);
        bits.rows = rows;
        Some(bits)
    }

    /// The non-NULL keys as a set to test rows against ([`KeySet`]): bitsets when dense enough, a
    /// sorted list otherwise.
    pub fn into_set(self) -> KeySet {
        let rows = self.non_null();
        if let Some((low, high)) = self.bounds
            && let Some(bits) = KeyBits::new(low, high, rows)
        {
            let mut bits = filled(bits, &self.parts);
            bits.rows = rows;
            return KeySet::Bits(bits);
        }
        let mut keys = Vec::with_capacity(rows);
        for part in self.parts {
            keys.extend_from_slice(&part);
        }
        keys.sort_unstable();
        keys.dedup();
        KeySet::Sorted(keys)
    }

    /// The keys held more than once ([`repeated_keys`]), then NULL (`None`) when more than one was
    /// NULL: NULL counts as one value, as `GROUP BY` counts it.
    pub fn repeated(self) -> Vec<Option<i64>> {
        let mut repeated: Vec<Option<i64>> = repeated_in(self.parts, self.bounds)
            .into_iter()
            .map(Some)
            .collect();
        if self.nulls > 1 {
            repeated.push(None);
        }
        repeated
    }
}

/// Integer keys to test rows against ([`Keys::into_set`]).
#[derive(Debug)]
pub enum KeySet {
    /// Dense keys: a bit test per row.
    Bits(KeyBits),
    /// Sparse keys, sorted and distinct: a binary search per row.
    Sorted(Vec<i64>),
}

impl KeySet {
    /// Whether `key` is in the set.
    pub fn contains(&self, key: i64) -> bool {
        match self {
            KeySet::Bits(bits) => bits.contains(key),
            KeySet::Sorted(keys) => keys.binary_search(&key).is_ok(),
        }
    }

    /// Whether a key from `low` to `high` (both included) is in the set.
    pub fn any_within(&self, low: i64, high: i64) -> bool {
        match self {
            KeySet::Bits(bits) => bits.any_within(low, high),
            KeySet::Sorted(keys) => {
                let first = keys.partition_point(|key| *key < low);
                keys.get(first).is_some_and(|key| *key <= high)
            }
        }
    }
}

/// One argument of any of [`INTEGER_TYPES`].
fn integer_signature() -> Signature {
    Signature::one_of(
        INTEGER_TYPES
            .into_iter()
            .map(|t| TypeSignature::Exact(vec![t]))
            .collect(),
        Volatility::Immutable,
    )
}

/// A scalar function named `name`, `name(key) -> BOOLEAN`: whether the integer key
/// ([`is_integer_key`]) is one of `keys` (false for NULL). A filter on it keeps or drops rows by a set
/// of keys at a bit test per row, where an anti join hashes every row against a hash table.
pub fn key_in(name: &str, keys: KeyBits) -> ScalarUDF {
    key_in_set(name, Arc::new(KeySet::Bits(keys)))
}

/// [`key_in`] for any [`KeySet`] (a sparse one tests each row by a binary search).
pub fn key_in_set(name: &str, keys: Arc<KeySet>) -> ScalarUDF {
    ScalarUDF::from(KeyIn {
        name: name.to_string(),
        signature: integer_signature(),
        keys,
    })
}

/// The function [`key_in`] makes: its name, and the set it tells.
#[derive(Debug)]
struct KeyIn {
    name: String,
    signature: Signature,
    keys: Arc<KeySet>,
}

// One function per name and set: two are the same when they hold the same set.
impl PartialEq for KeyIn {
    fn eq(&self, other: &KeyIn) -> bool {
        self.name == other.name && Arc::ptr_eq(&self.keys, &other.keys)
    }
}

impl Eq for KeyIn {}

impl std::hash::Hash for KeyIn {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        Arc::as_ptr(&self.keys).hash(state);
    }
}

impl ScalarUDFImpl for KeyIn {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [input] = arrays.as_slice() else {
            return Err(DataFusionError::Execution(format!(
                "{} takes exactly one argument",
                self.name
            )));
        };
        let values = datafusion::arrow::compute::cast(input, &DataType::Int64)?;
        let values = values.as_primitive::<Int64Type>();
        let found: BooleanArray = if values.null_count() == 0 {
            values
                .values()
                .iter()
                .map(|&k| Some(self.keys.contains(k)))
                .collect()
        } else {
            values
                .iter()
                .map(|k| Some(k.is_some_and(|k| self.keys.contains(k))))
                .collect()
        };
        Ok(ColumnarValue::Array(Arc::new(found)))
    }
}

/// The `count_repeated` aggregate function.
pub fn count_repeated() -> AggregateUDF {
    AggregateUDF::from(CountRepeated {
        signature: integer_signature(),
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
    keys: Keys,
}

impl Accumulator for KeysAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [values] = values else {
            return Err(DataFusionError::Execution(
                "count_repeated takes exactly one argument".into(),
            ));
        };
        self.keys.append(values)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [lists] = states else {
            return Err(DataFusionError::Internal(
                "count_repeated has one state column".into(),
            ));
        };
        let lists = lists.as_list::<i32>();
        for list in lists.iter().flatten() {
            self.keys.append(&list)?;
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let total = self.keys.non_null();
        // A list's offsets are 32-bit: more keys in one partition cannot be handed on.
        let length = i32::try_from(total).map_err(|_| {
            DataFusionError::Execution(format!(
                "count_repeated holds {total} keys in one partition, more than a list holds"
            ))
        })?;
        let mut parts = std::mem::take(&mut self.keys).parts;
        let keys = match parts.len() {
            0 => Part::from(Vec::new()),
            1 => parts.swap_remove(0),
            _ => {
                // Each part freed as it is copied.
                let mut all = Vec::with_capacity(total);
                for part in parts {
                    all.extend_from_slice(&part);
                }
                Part::from(all)
            }
        };
        let list = ListArray::try_new(
            Arc::new(Field::new_list_field(DataType::Int64, false)),
            OffsetBuffer::new(ScalarBuffer::from(vec![0, length])),
            Arc::new(Int64Array::new(keys, None)),
            None,
        )?;
        Ok(vec![ScalarValue::List(Arc::new(list))])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let keys = std::mem::take(&mut self.keys);
        let repeated = repeated_in(keys.parts, keys.bounds);
        Ok(ScalarValue::Int64(Some(repeated.len() as i64)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self)
            + self.keys.held
            + self.keys.parts.capacity() * std::mem::size_of::<Part>()
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

    /// Keys gathered from each array as a partition gathers them, then put together.
    fn in_parts(parts: impl IntoIterator<Item = Int64Array>) -> Keys {
        let mut keys = Keys::default();
        for part in parts {
            let mut own = Keys::default();
            own.append(&(Arc::new(part) as ArrayRef)).expect("integers");
            keys.extend(own);
        }
        keys
    }

    /// An array's keys are its own buffer, shared; a small slice of a larger array's is copied, so that
    /// the keys do not keep the whole array alive; NULLs are left out.
    #[test]
    fn a_part_shares_its_arrays_buffer_only_when_it_takes_most_of_it() {
        let whole: ArrayRef = Arc::new(Int64Array::from_iter_values(0..10_000));
        let shared = key_part(&whole).unwrap();
        assert_eq!(
            shared.as_ptr(),
            whole.as_primitive::<Int64Type>().values().as_ptr()
        );
        let slice = whole.slice(100, 10);
        let copied = key_part(&slice).unwrap();
        assert_eq!(copied.as_ref(), (100..110).collect::<Vec<i64>>().as_slice());
        assert!(
            copied.inner().capacity() < 1_000,
            "{}",
            copied.inner().capacity()
        );
        let with_nulls: ArrayRef = Arc::new(Int64Array::from(vec![Some(3), None, Some(4)]));
        assert_eq!(key_part(&with_nulls).unwrap().as_ref(), &[3, 4]);
    }

    /// Over [`PARALLEL_KEYS`], in one part or several (as partitions gather them), the bitsets are
    /// filled on several threads: the same repeated keys, bounds and bits as one pass over them all.
    #[test]
    fn many_keys_in_parts_give_what_one_pass_gives() {
        let n = 3 * PARALLEL_KEYS as i64;
        // Every key once, some twice or three times: one repeat lands in another part than its first.
        let all: Vec<i64> = (0..n).chain([0, 7, 7, n / 2, n - 1]).collect();
        let expected = vec![0, 7, n / 2, n - 1];
        assert_eq!(repeated_keys(all.clone()), expected);
        let keys_of =
            |parts: &[&[i64]]| in_parts(parts.iter().map(|p| Int64Array::from(p.to_vec())));
        let (head, tail) = all.split_at(all.len() / 3);
        let parts = keys_of(&[head, tail, &[]]);
        assert_eq!(parts.len(), all.len());
        assert_eq!(parts.bounds(), Some((0, n - 1)));
        assert_eq!(
            parts.repeated(),
            expected.iter().copied().map(Some).collect::<Vec<_>>()
        );
        let bits = keys_of(&[head, tail]).into_bits().expect("dense");
        let mut one_pass = KeyBits::new(0, n - 1, all.len()).expect("dense");
        all.iter().for_each(|&key| one_pass.insert(key));
        assert_eq!(
            (bits.seen == one_pass.seen, bits.again == one_pass.again),
            (true, true)
        );
        assert_eq!((bits.rows(), bits.repeated()), (all.len(), Some(4)));
        assert!((0..n).all(|key| bits.contains(key)) && !bits.contains(n + 64));
        // NULLs over two parts count as one value held twice; bitsets then do not stand for the keys.
        let with_nulls =
            |parts: [&[Option<i64>]; 2]| in_parts(parts.map(|p| Int64Array::from(p.to_vec())));
        let keys = with_nulls([&[Some(1), None, Some(2)], &[None, Some(2)]]);
        assert_eq!(
            (keys.len(), keys.nulls(), keys.bounds()),
            (5, 2, Some((1, 2)))
        );
        assert_eq!(keys.repeated(), vec![Some(2), None]);
        assert!(with_nulls([&[Some(1)], &[None]]).into_bits().is_none());
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

    proptest::proptest! {
        /// Keys split between two bitsets over the bounds of all of them, merged: the repeated count
        /// and the bounds of a count per key, NULLs one value; a key outside the bounds makes both
        /// unknown.
        #[test]
        fn key_bits_merged_count_what_a_count_per_key_counts(
            keys in proptest::collection::vec(proptest::option::weighted(0.9, -300i64..300), 1..400),
            split in 0usize..400,
            outside in proptest::option::of(1_000i64..10_000),
        ) {
            let values: Vec<i64> = keys.iter().flatten().copied().collect();
            let (Some(&low), Some(&high)) = (values.iter().min(), values.iter().max()) else {
                return Ok(());
            };
            let array = |keys: &[Option<i64>]| -> ArrayRef { Arc::new(Int64Array::from(keys.to_vec())) };
            let split = split.min(keys.len());
            let mut bits = KeyBits::new(low, high, 600).expect("dense enough");
            let mut other = bits.clone();
            bits.append(&array(&keys[..split])).unwrap();
            other.append(&array(&keys[split..])).unwrap();
            if let Some(key) = outside {
                other.append(&array(&[Some(key)])).unwrap();
            }
            bits.merge(&other);
            let nulls = keys.len() - values.len();
            let counted = by_counting(&values).len() as u64 + u64::from(nulls > 1);
            let known = outside.is_none();
            proptest::prop_assert_eq!(bits.repeated(), known.then_some(counted));
            proptest::prop_assert_eq!(bits.bounds(), known.then_some((low, high)));
            proptest::prop_assert_eq!(bits.rows(), keys.len() + usize::from(!known));
        }
    }

    #[test]
    fn key_bits_refuse_bounds_too_sparse_for_their_keys() {
        assert!(KeyBits::new(0, 64 * 10 - 1, 10).is_some());
        assert!(KeyBits::new(0, 64 * 10, 10).is_none());
        assert!(KeyBits::new(i64::MIN, i64::MAX, usize::MAX).is_none());
        assert!(KeyBits::new(5, 4, 10).is_none());
    }

    /// A key set of dense keys is bitsets, of sparse keys a sorted list; both tell their keys, and
    /// neither a NULL nor a key outside.
    #[test]
    fn a_key_set_tells_dense_and_sparse_keys_alike() {
        for values in [vec![3, 5, 6, 100, 5], vec![3, 5, 6, 1_000_000_000, 5]] {
            let mut keys = Keys::default();
            keys.append(
                &(Arc::new(Int64Array::from(
                    values
                        .iter()
                        .map(|v| Some(*v))
                        .chain([None])
                        .collect::<Vec<_>>(),
                )) as ArrayRef),
            )
            .unwrap();
            let set = keys.into_set();
            let dense = matches!(set, KeySet::Bits(_));
            assert_eq!(dense, values[3] == 100, "{values:?}");
            for key in [3, 5, 6, values[3]] {
                assert!(set.contains(key), "{key} in {values:?}");
            }
            for key in [2, 4, 7, 99, 101, i64::MIN, i64::MAX] {
                assert!(!set.contains(key), "{key} not in {values:?}");
            }
            // Ranges: every one holding a key, and none without, whatever words they cross.
            let high = values[3];
            for (low, up) in [(3, 3), (0, 3), (4, 5), (6, 99), (7, high), (high, i64::MAX)] {
                assert!(set.any_within(low, up), "{low}..={up} in {values:?}");
            }
            for (low, up) in [
                (i64::MIN, 2),
                (4, 4),
                (7, high - 1),
                (high + 1, i64::MAX),
                (9, 8),
            ] {
                assert!(!set.any_within(low, up), "{low}..={up} not in {values:?}");
            }
        }
        // Keys in the middle of words of a wide set, and ranges ending either side of them.
        let mut keys = Keys::default();
        let wide: Vec<i64> = (0..40).map(|i| i * 50 + 37).collect();
        keys.append(&(Arc::new(Int64Array::from(wide.clone())) as ArrayRef))
            .unwrap();
        let set = keys.into_set();
        assert!(matches!(set, KeySet::Bits(_)));
        for key in wide {
            assert!(set.any_within(key, key) && set.any_within(key - 63, key));
            assert!(set.any_within(key, key + 63));
            assert!(!set.any_within(key + 1, key + 49) && !set.any_within(key - 49, key - 1));
        }
    }

    /// `key_in` over a set of keys: true for its keys, false for others, those outside its bounds and
    /// NULL, over BIGINT and INT columns alike; a filter on its negation keeps the rest.
    #[tokio::test]
    async fn key_in_tells_the_keys_of_its_set() {
        let mut keys = Keys::default();
        keys.append(&(Arc::new(Int64Array::from(vec![3, 5, 6, 100])) as ArrayRef))
            .unwrap();
        let bits = keys.into_bits().expect("dense");
        // The bitsets hold 3 to 130 (two words): 101 to 130 lie past the greatest key.
        let tells = [
            (3, true),
            (4, false),
            (100, true),
            (2, false),
            (101, false),
            (130, false),
        ];
        for (key, inside) in tells.into_iter().chain([(131, false), (1_000, false)]) {
            assert_eq!(bits.contains(key), inside, "{key}");
        }
        assert!(!bits.contains(i64::MIN) && !bits.contains(i64::MAX));
        let ctx = SessionContext::new();
        ctx.register_udf(key_in("changed", bits));
        let values = "(VALUES (1), (3), (NULL), (5), (7), (100), (130), (1000)) AS t(k)";
        for sql in [
            format!("SELECT k FROM {values} WHERE NOT changed(k) ORDER BY k"),
            format!(
                "SELECT CAST(k32 AS BIGINT) FROM (SELECT CAST(k AS INT) AS k32 FROM {values}) \
                 WHERE NOT changed(k32) ORDER BY 1"
            ),
        ] {
            let out = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
            let kept: Vec<Option<i64>> = out
                .iter()
                .flat_map(|b| {
                    b.column(0)
                        .as_primitive::<Int64Type>()
                        .iter()
                        .collect::<Vec<_>>()
                })
                .collect();
            assert_eq!(
                kept,
                [Some(1), Some(7), Some(130), Some(1000), None],
                "{sql}"
            );
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
