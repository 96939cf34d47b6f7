//! Slices: a result computed one range of a column's values at a time. A stage whose
//! `incremental.column` promises that an output row depends only on the input rows holding its value
//! gives the same rows computed range by range as computed at once; an aggregation over ten million
//! rows then holds the groups of one range, not of the whole table. The ranges come from the source
//! table's file statistics, cut so that each holds about the same number of source rows, and together
//! they hold every value, NULL included.

use std::{collections::VecDeque, sync::Arc};

use chrono::Datelike;
use datafusion::{
    error::DataFusionError,
    execution::SendableRecordBatchStream,
    physical_plan::stream::RecordBatchStreamAdapter,
    prelude::{DataFrame, Expr, col, lit},
};
use deltalake::DeltaTable;
use futures::StreamExt;

use crate::storage::Location;

use super::DeltaError;

/// Source rows per slice. An aggregation of the reference pipeline holds a few hundred MiB per ten
/// million rows it groups (merchant_daily keeps about one group per row, daily_kpis a distinct set of
/// cards per day), so two million keep a slice well under the 1 GiB a run aims at.
pub const SLICE_ROWS: u64 = 2_000_000;

/// The ranges of `column`'s values a result is computed in: below the first bound, between each
/// bound and the next, and from the last bound up (with NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slices {
    pub column: String,
    /// Increasing, as the column's values are written in a Delta log: `2019-01-31`, `42`.
    bounds: Vec<String>,
}

/// How a column's values are ordered and counted: days for dates, the number for integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Date,
    Integer,
}

impl Kind {
    fn ordinal(self, value: &serde_json::Value) -> Option<i64> {
        match self {
            Kind::Integer => value.as_i64(),
            Kind::Date => chrono::NaiveDate::parse_from_str(value.as_str()?, "%Y-%m-%d")
                .ok()
                .map(|d| i64::from(d.num_days_from_ce())),
        }
    }

    fn text(self, ordinal: i64) -> Option<String> {
        match self {
            Kind::Integer => Some(ordinal.to_string()),
            Kind::Date => i32::try_from(ordinal)
                .ok()
                .and_then(chrono::NaiveDate::from_num_days_from_ce_opt)
                .map(|d| d.format("%Y-%m-%d").to_string()),
        }
    }
}

impl Slices {
    /// Slices of `column` at `bounds` (increasing), for tests of what computes in them.
    #[cfg(test)]
    pub(super) fn at(column: &str, bounds: &[&str]) -> Slices {
        Slices {
            column: column.to_string(),
            bounds: bounds.iter().map(|b| b.to_string()).collect(),
        }
    }

    /// Slices of about `rows_per_slice` rows of `source`, by the least and greatest value of `column`
    /// in each of its files (rows assumed spread evenly between them). `None` when one slice would do,
    /// or when the files say nothing usable about the column (no statistics, not a date or an integer).
    pub fn plan(
        path: &Location,
        source: &DeltaTable,
        column: &str,
        rows_per_slice: u64,
    ) -> Result<Option<Slices>, DeltaError> {
        let snapshot = source.snapshot().map_err(|e| DeltaError::table(path, e))?;
        let mut kind = None;
        let mut files = Vec::new();
        for file in snapshot.log_data() {
            let rows = file.num_records().unwrap_or(0) as u64;
            let Some(stats) = file
                .stats()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            else {
                continue;
            };
            let (Some(low), Some(high)) = (
                stats.get("minValues").and_then(|v| v.get(column)),
                stats.get("maxValues").and_then(|v| v.get(column)),
            ) else {
                continue;
            };
            let kind = *kind.get_or_insert(if low.is_string() {
                Kind::Date
            } else {
                Kind::Integer
            });
            if let (Some(low), Some(high)) = (kind.ordinal(low), kind.ordinal(high))
                && low <= high
            {
                files.push((low, high, rows));
            }
        }
        let Some(kind) = kind else {
            return Ok(None);
        };
        Ok(bounds(&files, rows_per_slice)
            .into_iter()
            .map(|b| kind.text(b))
            .collect::<Option<Vec<String>>>()
            .filter(|bounds| !bounds.is_empty())
            .map(|bounds| Slices {
                column: column.to_string(),
                bounds,
            }))
    }

    /// The bounds as the file writers cut files at them ([`super::files::Cuts`]); `None` for a bound
    /// neither an integer nor a date.
    pub(super) fn cuts(&self) -> Option<super::files::Cuts> {
        let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
        let bounds = self
            .bounds
            .iter()
            .map(|bound| match bound.parse::<i64>() {
                Ok(number) => Some(number),
                Err(_) => chrono::NaiveDate::parse_from_str(bound, "%Y-%m-%d")
                    .ok()
                    .map(|date| (date - epoch).num_days()),
            })
            .collect::<Option<Vec<i64>>>()?;
        Some(super::files::Cuts::new(self.column.clone(), bounds))
    }

    /// One predicate per slice on the column of `data`, with the bounds typed like it. Every value
    /// is in exactly one of them: the first is open below, the last open above and holds NULL.
    pub fn predicates(&self, data: &DataFrame) -> Result<Vec<Expr>, String> {
        let data_type = super::overwrite::column_type(data, &self.column)?;
        let bounds = self
            .bounds
            .iter()
            .map(|value| super::overwrite::typed_literal(value, &data_type, &self.column))
            .collect::<Result<Vec<Expr>, String>>()?;
        let column = col(datafusion::common::Column::new_unqualified(&self.column));
        let mut predicates = Vec::with_capacity(bounds.len() + 1);
        let mut below = None;
        for bound in bounds {
            let under = column.clone().lt(bound.clone());
            predicates.push(match below.take() {
                None => under,
                Some(low) => column.clone().gt_eq(low).and(under),
            });
            below = Some(bound);
        }
        let last = match below {
            Some(low) => column.clone().gt_eq(low),
            None => lit(true),
        };
        predicates.push(last.or(column.is_null()));
        Ok(predicates)
    }
}

/// Runs `data` one slice at a time: the result's partitions, each of which reads the partitions of one
/// slice after another. A slice's query starts when the first partition has read everything the
/// slices before it gave out, so at most two slices run at once (one ending, the next starting) and
/// the memory they hold is that of two slices, not of the whole result.
pub(super) async fn execute_in_slices(
    path: &Location,
    data: &DataFrame,
    predicates: Vec<Expr>,
) -> Result<Vec<SendableRecordBatchStream>, DeltaError> {
    let query = |e| DeltaError::query(path, e);
    let mut parts: VecDeque<DataFrame> = predicates
        .into_iter()
        .map(|predicate| data.clone().filter(predicate))
        .collect::<Result<_, _>>()
        .map_err(query)?;
    let Some(first) = parts.pop_front() else {
        return Ok(Vec::new());
    };
    let ready: VecDeque<_> = execute(first).await.map_err(query)?.into();
    // The physical schema (strings may be views), which every slice's plan shares.
    let schema = ready
        .front()
        .map(|stream| stream.schema())
        .unwrap_or_else(|| Arc::new(data.schema().as_arrow().clone()));
    let partitions = ready.len().max(1);
    let queue = Arc::new(tokio::sync::Mutex::new(Queue { ready, parts }));
    Ok((0..partitions)
        .map(|_| {
            let stream = futures::stream::unfold(
                (queue.clone(), None::<SendableRecordBatchStream>, false),
                |(queue, mut current, done)| async move {
                    if done {
                        return None;
                    }
                    loop {
                        if let Some(stream) = current.as_mut()
                            && let Some(item) = stream.next().await
                        {
                            return Some((item, (queue, current, false)));
                        }
                        let next = queue.lock().await.next().await;
                        match next {
                            Ok(Some(next)) => current = Some(next),
                            Ok(None) => return None,
                            Err(error) => return Some((Err(error), (queue, None, true))),
                        }
                    }
                },
            );
            Box::pin(RecordBatchStreamAdapter::new(schema.clone(), stream)) as _
        })
        .collect())
}

/// The partitions of the slices not read yet: those of the slice running, then the slices to run.
struct Queue {
    ready: VecDeque<SendableRecordBatchStream>,
    parts: VecDeque<DataFrame>,
}

impl Queue {
    /// The next partition to read, starting the next slice's query when the running one has none left.
    async fn next(&mut self) -> Result<Option<SendableRecordBatchStream>, DataFusionError> {
        loop {
            if let Some(stream) = self.ready.pop_front() {
                return Ok(Some(stream));
            }
            let Some(part) = self.parts.pop_front() else {
                return Ok(None);
            };
            self.ready.extend(execute(part).await?);
        }
    }
}

/// Starts `data`'s query without its final sort (see [`super::overwrite::without_final_sort`]).
async fn execute(data: DataFrame) -> Result<Vec<SendableRecordBatchStream>, DataFusionError> {
    let task = Arc::new(data.task_ctx());
    let plan = data.create_physical_plan().await?;
    datafusion::physical_plan::execute_stream_partitioned(
        super::overwrite::without_final_sort(plan),
        task,
    )
}

/// The bounds that cut `files` ((least, greatest, rows) each) into slices of about `rows_per_slice`
/// rows: each is the least value with that many rows below it, counting a file's rows as spread
/// evenly over its values. Empty when the rows fit in one slice.
fn bounds(files: &[(i64, i64, u64)], rows_per_slice: u64) -> Vec<i64> {
    let total: u64 = files.iter().map(|f| f.2).sum();
    let slices = total.div_ceil(rows_per_slice.max(1));
    if slices < 2 {
        return Vec::new();
    }
    let below = |value: i64| -> f64 {
        files
            .iter()
            .map(|&(low, high, rows)| {
                let span = (high - low + 1) as f64;
                rows as f64 * ((value - low) as f64 / span).clamp(0.0, 1.0)
            })
            .sum()
    };
    let least = files.iter().map(|f| f.0).min().unwrap_or(0);
    let greatest = files.iter().map(|f| f.1).max().unwrap_or(0);
    let mut bounds: Vec<i64> = Vec::new();
    for slice in 1..slices {
        let wanted = total as f64 * slice as f64 / slices as f64;
        // The least value with `wanted` rows below it (`below` grows with the value).
        let (mut low, mut high) = (least, greatest + 1);
        while low < high {
            let middle = low + (high - low) / 2;
            if below(middle) >= wanted {
                high = middle;
            } else {
                low = middle + 1;
            }
        }
        if low > least && low <= greatest && bounds.last().is_none_or(|&last| low > last) {
            bounds.push(low);
        }
    }
    bounds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_cut_the_rows_into_even_slices() {
        // Three files of disjoint ranges, 300 rows over values 0..=299.
        let files = [(0, 99, 100), (100, 199, 100), (200, 299, 100)];
        assert_eq!(bounds(&files, 100), [100, 200]);
        assert_eq!(bounds(&files, 150), [150]);
        assert_eq!(bounds(&files, 300), Vec::<i64>::new());
        // A file of many rows over few values weighs more than its span.
        let files = [(0, 99, 100), (100, 109, 900)];
        assert_eq!(bounds(&files, 500), [105]);
        // One value holding every row cannot be cut.
        assert_eq!(bounds(&[(7, 7, 1000)], 10), Vec::<i64>::new());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_predicates_hold_every_value_once() {
        let ctx = crate::delta::session(None).unwrap();
        let data = ctx
            .sql(
                "SELECT * FROM (VALUES (DATE '2018-12-31'), (DATE '2019-01-01'), (DATE '2019-06-30'), \
                 (DATE '2019-07-01'), (DATE '2030-01-01'), (NULL)) AS t(d)",
            )
            .await
            .unwrap();
        let slices = Slices {
            column: "d".into(),
            bounds: vec!["2019-01-01".into(), "2019-07-01".into()],
        };
        let mut counts = Vec::new();
        for predicate in slices.predicates(&data).unwrap() {
            counts.push(
                data.clone()
                    .filter(predicate)
                    .unwrap()
                    .count()
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(counts, [1, 2, 3]);
        // The writers' cuts put each row in the slice its predicate does.
        let cuts = slices.cuts().unwrap();
        let mut ranges = Vec::new();
        for batch in data.collect().await.unwrap() {
            for row in 0..batch.num_rows() {
                ranges.push(cuts.range_of(&batch.slice(row, 1)).unwrap());
            }
        }
        assert_eq!(ranges, [0, 1, 1, 2, 2, 2]);
    }
}
