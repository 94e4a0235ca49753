//! [`SessionAggregate`]: `GROUP BY` over SESSION windows.
//!
//! A record at time `t` stands for the window `[t, t + gap)`; a key's windows that overlap
//! merge into one session `[first, last + gap)`. A session is emitted once, when the
//! watermark passes its end plus the allowed lateness. A key may have several sessions open
//! at once (a record out of order opens one behind another), and a record bridging two of
//! them merges them.
//!
//! Each session holds one row [`Accumulator`] per aggregate; a merge moves one session's
//! states into the other's accumulators. A batch's rows are grouped by session with one
//! stable sort, so each session's accumulators see one slice per batch, in arrival order.
//!
//! A record is late, dropped and counted, when its own window `[t, t + gap)` has closed, or
//! when it falls before the end of a session of its key already emitted: that session's
//! rows are final, and a second, overlapping session for the same key would be wrong.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, BooleanArray, TimestampMillisecondArray, UInt32Array};
use arrow::compute::{filter, take};
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use datafusion::common::{HashMap, ScalarValue};
use datafusion::logical_expr::Accumulator;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;

use super::window::{
    AggregateArguments, LateRecords, TICK, WindowAggregateSpec, WindowKind, advance,
    aggregate_inputs, event_times, key_columns, lay_out, now_ms, prepare,
};
use crate::checkpoint::Snapshot;
use crate::error::{Error, Result};
use crate::message::{Message, Watermark};
use crate::operator::{Operator, StateReport};

/// A running session-window aggregation (one per pipeline).
pub struct SessionAggregate {
    spec: Arc<WindowAggregateSpec>,
    gap: i64,
    /// Each aggregate's arguments, then its `ORDER BY` expressions.
    arguments: AggregateArguments,
    /// Encodes the key columns as bytes (and back, for output).
    converter: RowConverter,
    /// How many key columns the converter encodes.
    key_columns: usize,
    keys: HashMap<Arc<[u8]>, KeySessions>,
    slab: Slab,
    /// Open sessions by end (`last + gap`), to close them in order.
    by_end: BTreeSet<(i64, usize)>,
    /// Open sessions by start, for the watermark passed downstream.
    by_start: BTreeSet<(i64, usize)>,
    /// Keys with no open session, by the end of the one last emitted, oldest first: a key is
    /// forgotten once no record on time can fall before that end.
    idle: VecDeque<(i64, Arc<[u8]>)>,
    watermark: Option<i64>,
    /// The watermark last passed downstream.
    forwarded: Option<i64>,
    late: LateRecords,
    last_emit_lag: Option<i64>,
    /// Estimated state bytes, recomputed at most once a second (it walks every session).
    bytes: std::cell::Cell<(usize, Option<Instant>)>,
}

/// A key's open sessions and the end of the last one emitted.
struct KeySessions {
    /// Open sessions' slots, ordered by start; their windows do not overlap.
    open: Vec<usize>,
    /// Records before this time are late: they belong to a session already emitted.
    emitted_end: i64,
}

struct Session {
    key: Arc<[u8]>,
    /// The first and last record's time.
    start: i64,
    last: i64,
    /// The `(start, end)` under which `by_start` and `by_end` hold it, if they do.
    indexed: Option<(i64, i64)>,
    accumulators: Vec<Box<dyn Accumulator>>,
}

/// Sessions by slot; slots of closed sessions are reused.
#[derive(Default)]
struct Slab {
    sessions: Vec<Option<Session>>,
    free: Vec<usize>,
}

impl Slab {
    fn insert(&mut self, session: Session) -> usize {
        match self.free.pop() {
            Some(slot) => {
                self.sessions[slot] = Some(session);
                slot
            }
            None => {
                self.sessions.push(Some(session));
                self.sessions.len() - 1
            }
        }
    }

    fn get_mut(&mut self, slot: usize) -> Result<&mut Session> {
        self.sessions
            .get_mut(slot)
            .and_then(Option::as_mut)
            .ok_or_else(|| Error::Internal(format!("session slot {slot} is empty")))
    }

    /// Takes a session out; its slot is reused only once `release`d.
    fn take(&mut self, slot: usize) -> Result<Session> {
        self.sessions
            .get_mut(slot)
            .and_then(Option::take)
            .ok_or_else(|| Error::Internal(format!("session slot {slot} is empty")))
    }

    fn release(&mut self, slots: impl IntoIterator<Item = usize>) {
        self.free.extend(slots);
    }
}

/// A session merged into another in the current batch.
struct Merged {
    from: usize,
    into: usize,
    /// Where `by_start` / `by_end` held it.
    indexed: Option<(i64, i64)>,
}

/// A row not assigned to any session (late, or without a time).
const DROPPED: u32 = u32::MAX;

/// The JSON part of a session window's snapshot.
#[derive(serde::Deserialize)]
struct SessionMeta {
    watermark: Option<i64>,
    forwarded: Option<i64>,
    late: u64,
}

/// A batch of `columns` named `c0`, `c1`, ... (a snapshot's columns are read by position).
fn numbered_batch(columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    let fields: Vec<arrow::datatypes::Field> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| arrow::datatypes::Field::new(format!("c{i}"), c.data_type().clone(), true))
        .collect();
    let rows = columns.first().map_or(0, |c| c.len());
    let options = arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows));
    Ok(RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        columns,
        &options,
    )?)
}

impl SessionAggregate {
    pub fn try_new(spec: Arc<WindowAggregateSpec>, input_schema: &Schema) -> Result<Self> {
        let WindowKind::Session { gap } = spec.kind else {
            return Err(Error::Internal(
                "SessionAggregate computes session windows only".into(),
            ));
        };
        let (key_schema, arguments) = prepare(&spec, input_schema)?;
        let converter = RowConverter::new(
            key_schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        Ok(Self {
            key_columns: key_schema.fields().len(),
            spec,
            gap,
            arguments,
            converter,
            keys: HashMap::default(),
            slab: Slab::default(),
            by_end: BTreeSet::new(),
            by_start: BTreeSet::new(),
            idle: VecDeque::new(),
            watermark: None,
            forwarded: None,
            late: LateRecords::default(),
            last_emit_lag: None,
            bytes: std::cell::Cell::new((0, None)),
        })
    }

    /// Records dropped because their window had closed.
    pub fn late_dropped(&self) -> u64 {
        self.late.count
    }

    /// Sessions open.
    pub fn open_sessions(&self) -> usize {
        self.by_end.len()
    }

    /// Assigns each row of a batch to a session, opening and merging sessions; `DROPPED` for
    /// late rows. Returns the slots and how many rows were late.
    fn assign(
        &mut self,
        time: &TimestampMillisecondArray,
        keys: &arrow::row::Rows,
        touched: &mut Vec<usize>,
    ) -> Result<(Vec<u32>, u64)> {
        let (gap, lateness) = (self.gap, self.spec.allowed_lateness);
        let watermark = self.watermark;
        let mut slots = Vec::with_capacity(time.len());
        let mut late = 0u64;
        // Sessions merged away in this batch. Their slots are released after the batch, so
        // that rows already assigned to them can be redirected.
        let mut merged: Vec<Merged> = Vec::new();
        for (row, t) in time.iter().enumerate() {
            let Some(t) = t else {
                late += 1;
                slots.push(DROPPED);
                continue;
            };
            if watermark.is_some_and(|w| t.saturating_add(gap).saturating_add(lateness) <= w) {
                late += 1;
                slots.push(DROPPED);
                continue;
            }
            let key = keys.row(row);
            let bytes = key.as_ref();
            if !self.keys.contains_key(bytes) {
                self.keys.insert(
                    Arc::from(bytes),
                    KeySessions {
                        open: Vec::new(),
                        emitted_end: i64::MIN,
                    },
                );
            }
            let Some((key, sessions)) = self.keys.get_key_value_mut(bytes) else {
                return Err(Error::Internal("session key vanished".into()));
            };
            if t < sessions.emitted_end {
                late += 1;
                slots.push(DROPPED);
                continue;
            }
            let slot = join_or_open(
                key,
                sessions,
                &mut self.slab,
                &self.spec.aggregates,
                gap,
                t,
                &mut merged,
            )?;
            touched.push(slot);
            slots.push(slot as u32);
        }
        if !merged.is_empty() {
            for m in &merged {
                if let Some((start, end)) = m.indexed {
                    self.by_start.remove(&(start, m.from));
                    self.by_end.remove(&(end, m.from));
                }
            }
            let into: HashMap<usize, usize> = merged.iter().map(|m| (m.from, m.into)).collect();
            let resolve = |mut slot: usize| {
                while let Some(&next) = into.get(&slot) {
                    slot = next;
                }
                slot
            };
            for slot in slots.iter_mut().filter(|s| **s != DROPPED) {
                *slot = resolve(*slot as usize) as u32;
            }
            touched.retain(|s| !into.contains_key(s));
            self.slab.release(into.keys().copied());
        }
        Ok((slots, late))
    }

    /// Re-indexes the sessions a batch changed.
    fn reindex(&mut self, touched: &[usize]) -> Result<()> {
        for &slot in touched {
            let gap = self.gap;
            let session = self.slab.get_mut(slot)?;
            let now = (session.start, session.last.saturating_add(gap));
            if session.indexed == Some(now) {
                continue;
            }
            if let Some((start, end)) = session.indexed.replace(now) {
                self.by_start.remove(&(start, slot));
                self.by_end.remove(&(end, slot));
            }
            self.by_start.insert((now.0, slot));
            self.by_end.insert((now.1, slot));
        }
        Ok(())
    }

    /// Emits every session whose end plus the allowed lateness `mark` passes (all of them
    /// when `mark` is `i64::MAX`).
    fn close(&mut self, mark: i64, out: &mut Vec<Message>) -> Result<()> {
        let lateness = self.spec.allowed_lateness;
        let mut closing = Vec::new();
        while let Some(&(end, slot)) = self.by_end.first() {
            if mark != i64::MAX && end.saturating_add(lateness) > mark {
                break;
            }
            self.by_end.pop_first();
            closing.push((end, slot));
        }
        if let Some(&(end, _)) = closing.last() {
            self.last_emit_lag = (mark != i64::MAX).then(|| mark.saturating_sub(end));
        }
        let mut sessions = Vec::with_capacity(closing.len());
        for (end, slot) in closing {
            let session = self.slab.take(slot)?;
            self.slab.release([slot]);
            self.by_start.remove(&(session.start, slot));
            if let Some(key) = self.keys.get_mut(&session.key) {
                key.open.retain(|&s| s != slot);
                key.emitted_end = key.emitted_end.max(end);
                if key.open.is_empty() {
                    self.idle.push_back((end, session.key.clone()));
                }
            }
            sessions.push(session);
        }
        // A record on time has t > mark - gap - lateness: keys idle since before that are
        // past reach of any.
        let horizon = mark.saturating_sub(self.gap).saturating_sub(lateness);
        while let Some((end, _)) = self.idle.front() {
            if *end > horizon {
                break;
            }
            if let Some((end, key)) = self.idle.pop_front() {
                let forget = self
                    .keys
                    .get(&key)
                    .is_some_and(|k| k.open.is_empty() && k.emitted_end == end);
                if forget {
                    self.keys.remove(&key);
                }
            }
        }
        if sessions.is_empty() {
            return Ok(());
        }
        out.push(Message::Data(self.output(sessions)?));
        Ok(())
    }

    /// Closed sessions as rows.
    fn output(&self, mut sessions: Vec<Session>) -> Result<RecordBatch> {
        let rows = sessions.len();
        let parser = self.converter.parser();
        let keys = self
            .converter
            .convert_rows(sessions.iter().map(|s| parser.parse(&s.key)))?;
        let start: ArrayRef = Arc::new(TimestampMillisecondArray::from_iter_values(
            sessions.iter().map(|s| s.start),
        ));
        let end: ArrayRef = Arc::new(TimestampMillisecondArray::from_iter_values(
            sessions.iter().map(|s| s.last.saturating_add(self.gap)),
        ));
        let values = (0..self.spec.aggregates.len())
            .map(|i| {
                let scalars = sessions
                    .iter_mut()
                    .map(|s| s.accumulators[i].evaluate())
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                Ok(ScalarValue::iter_to_array(scalars)?)
            })
            .collect::<Result<Vec<_>>>()?;
        lay_out(&self.spec, keys, values, rows, start, end)
    }

    fn state_bytes(&self) -> usize {
        let (bytes, at) = self.bytes.get();
        if at.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return bytes;
        }
        let sessions: usize = self
            .slab
            .sessions
            .iter()
            .flatten()
            .map(|s| {
                std::mem::size_of::<Session>()
                    + s.accumulators.iter().map(|a| a.size()).sum::<usize>()
            })
            .sum();
        let keys: usize = self
            .keys
            .keys()
            .map(|k| k.len() + std::mem::size_of::<(Arc<[u8]>, KeySessions)>())
            .sum();
        let bytes = sessions + keys;
        self.bytes.set((bytes, Some(Instant::now())));
        bytes
    }
}

/// The session of `sessions` that a record at `t` joins, merging the sessions its window
/// bridges, or a new one.
fn join_or_open(
    key: &Arc<[u8]>,
    sessions: &mut KeySessions,
    slab: &mut Slab,
    aggregates: &[Arc<AggregateFunctionExpr>],
    gap: i64,
    t: i64,
    merged: &mut Vec<Merged>,
) -> Result<usize> {
    let reach = t.saturating_add(gap);
    let mut overlapping = Vec::new();
    for (i, &slot) in sessions.open.iter().enumerate() {
        let session = slab.get_mut(slot)?;
        if t < session.last.saturating_add(gap) && session.start < reach {
            overlapping.push(i);
        }
    }
    let Some(&first) = overlapping.first() else {
        let session = Session {
            key: key.clone(),
            start: t,
            last: t,
            indexed: None,
            accumulators: aggregates
                .iter()
                .map(|a| Ok(a.create_accumulator()?))
                .collect::<Result<_>>()?,
        };
        let slot = slab.insert(session);
        let at = sessions
            .open
            .iter()
            .position(|&s| slab.get_mut(s).is_ok_and(|s| s.start > t))
            .unwrap_or(sessions.open.len());
        sessions.open.insert(at, slot);
        return Ok(slot);
    };
    let into = sessions.open[first];
    // Disjoint sessions sorted by start: those overlapping one window are adjacent.
    for &i in overlapping.iter().skip(1) {
        let from = sessions.open[i];
        let mut other = slab.take(from)?;
        let session = slab.get_mut(into)?;
        session.start = session.start.min(other.start);
        session.last = session.last.max(other.last);
        for (acc, source) in session.accumulators.iter_mut().zip(&mut other.accumulators) {
            let states = source
                .state()?
                .into_iter()
                .map(|s| Ok(s.to_array()?))
                .collect::<Result<Vec<_>>>()?;
            acc.merge_batch(&states)?;
        }
        merged.push(Merged {
            from,
            into,
            indexed: other.indexed,
        });
    }
    let last = overlapping.len();
    sessions.open.drain(first + 1..first + last);
    let session = slab.get_mut(into)?;
    session.start = session.start.min(t);
    session.last = session.last.max(t);
    Ok(into)
}

impl SessionAggregate {
    /// Forwards the watermark `mark` (event time, or the clock), held back to what may still
    /// be emitted: rows emitted later start at an open session's start, or (a new session)
    /// after mark - gap - lateness.
    fn forward(&mut self, mark: i64, out: &mut Vec<Message>) {
        let mut held = mark
            .saturating_sub(self.spec.allowed_lateness)
            .saturating_sub(self.gap);
        if let Some(&(start, _)) = self.by_start.first() {
            held = held.min(start.saturating_sub(1));
        }
        if self.forwarded.is_none_or(|f| held > f) {
            self.forwarded = Some(held);
            out.push(Message::Watermark(Watermark(held)));
        }
    }
}

impl Operator for SessionAggregate {
    fn name(&self) -> &'static str {
        "session_aggregate"
    }

    fn process_batch(&mut self, batch: RecordBatch, _out: &mut Vec<Message>) -> Result<()> {
        let time = event_times(&self.spec, &batch)?;
        let keys = key_columns(&self.spec, &batch)?;
        let encoded = self.converter.convert_columns(&keys)?;
        let mut touched = Vec::new();
        let (slots, late) = self.assign(&time, &encoded, &mut touched)?;
        self.late.dropped(late, self.watermark);
        self.reindex(&touched)?;
        // Rows grouped by session, in arrival order within one.
        let mut order: Vec<u32> = (0..slots.len() as u32)
            .filter(|&row| slots[row as usize] != DROPPED)
            .collect();
        if order.is_empty() {
            return Ok(());
        }
        order.sort_by_key(|&row| slots[row as usize]);
        let (mut inputs, mut filters) = aggregate_inputs(&self.spec, &self.arguments, &batch)?;
        let in_place =
            order.len() == slots.len() && order.iter().enumerate().all(|(i, &r)| i == r as usize);
        if !in_place {
            let indices = UInt32Array::from(order.clone());
            for columns in &mut inputs {
                for column in columns.iter_mut() {
                    *column = take(column.as_ref(), &indices, None)?;
                }
            }
            for f in filters.iter_mut().flatten() {
                let taken = take(&*f, &indices, None)?;
                *f = arrow::array::AsArray::as_boolean(&taken).clone();
            }
        }
        let mut offset = 0;
        while offset < order.len() {
            let slot = slots[order[offset] as usize];
            let len = order[offset..]
                .iter()
                .take_while(|&&row| slots[row as usize] == slot)
                .count();
            let session = self.slab.get_mut(slot as usize)?;
            for (i, acc) in session.accumulators.iter_mut().enumerate() {
                let mut values: Vec<ArrayRef> =
                    inputs[i].iter().map(|c| c.slice(offset, len)).collect();
                if let Some(f) = &filters[i] {
                    let keep: BooleanArray = f.slice(offset, len);
                    values = values
                        .iter()
                        .map(|v| Ok(filter(v.as_ref(), &keep)?))
                        .collect::<Result<_>>()?;
                }
                acc.update_batch(&values)?;
            }
            offset += len;
        }
        Ok(())
    }

    fn on_watermark(&mut self, watermark: Watermark, out: &mut Vec<Message>) -> Result<()> {
        if !advance(&mut self.watermark, &self.spec, watermark) {
            return Ok(());
        }
        self.close(watermark.0, out)?;
        self.forward(watermark.0, out);
        Ok(())
    }

    fn on_end(&mut self, out: &mut Vec<Message>) -> Result<()> {
        self.close(i64::MAX, out)?;
        self.last_emit_lag = None;
        Ok(())
    }

    fn tick_interval(&self) -> Option<Duration> {
        self.spec.processing_time.then_some(TICK)
    }

    fn on_tick(&mut self, out: &mut Vec<Message>) -> Result<()> {
        let now = now_ms();
        self.watermark = Some(now);
        self.close(now, out)?;
        // As in `on_watermark`: the clock, held back to what may still be emitted, is the
        // watermark of what comes after.
        self.forward(now, out);
        Ok(())
    }

    /// Two batches: every open session (its key columns, `start`, `last`, then each
    /// aggregate's state columns) and every key that has emitted a session (key columns,
    /// `emitted_end`), which decides what is late for it; plus the watermarks and the late
    /// count. Reading a row accumulator's state consumes it, so each is rebuilt from the
    /// state it gave.
    fn snapshot(&mut self) -> Result<Option<Snapshot>> {
        let mut keys = Vec::new();
        let mut starts = Vec::new();
        let mut lasts = Vec::new();
        let mut states: Vec<Vec<Vec<ScalarValue>>> = self
            .spec
            .aggregates
            .iter()
            .map(|a| Ok(vec![Vec::new(); a.state_fields()?.len()]))
            .collect::<Result<_>>()?;
        for session in self.slab.sessions.iter_mut().flatten() {
            keys.push(session.key.clone());
            starts.push(session.start);
            lasts.push(session.last);
            for (i, acc) in session.accumulators.iter_mut().enumerate() {
                let state = acc.state()?;
                let arrays = state
                    .iter()
                    .map(|s| Ok(s.to_array()?))
                    .collect::<Result<Vec<_>>>()?;
                let mut fresh = self.spec.aggregates[i].create_accumulator()?;
                fresh.merge_batch(&arrays)?;
                *acc = fresh;
                for (column, value) in states[i].iter_mut().zip(state) {
                    column.push(value);
                }
            }
        }
        let parser = self.converter.parser();
        let mut columns = self
            .converter
            .convert_rows(keys.iter().map(|k| parser.parse(k)))?;
        columns.push(Arc::new(arrow::array::Int64Array::from(starts)));
        columns.push(Arc::new(arrow::array::Int64Array::from(lasts)));
        for column in states.into_iter().flatten() {
            columns.push(if column.is_empty() {
                arrow::array::new_empty_array(&DataType::Null)
            } else {
                ScalarValue::iter_to_array(column)?
            });
        }
        let sessions = numbered_batch(columns)?;
        let (emitted, ends): (Vec<_>, Vec<_>) = self
            .keys
            .iter()
            .filter(|(_, k)| k.emitted_end != i64::MIN)
            .map(|(key, k)| (key.clone(), k.emitted_end))
            .unzip();
        let mut columns = self
            .converter
            .convert_rows(emitted.iter().map(|k| parser.parse(k)))?;
        columns.push(Arc::new(arrow::array::Int64Array::from(ends)));
        let emitted = numbered_batch(columns)?;
        let meta = serde_json::json!({
            "watermark": self.watermark,
            "forwarded": self.forwarded,
            "late": self.late.count,
        });
        Ok(Some(Snapshot::new(meta, vec![sessions, emitted])))
    }

    fn restore(&mut self, snapshot: Snapshot) -> Result<()> {
        let meta: SessionMeta = serde_json::from_value(snapshot.meta)
            .map_err(|e| Error::Execution(format!("session state is unreadable: {e}")))?;
        let [sessions, emitted] = snapshot.batches.as_slice() else {
            return Err(Error::Execution(
                "session state is unreadable: two batches expected".into(),
            ));
        };
        let key_count = self.key_columns;
        let state_counts = self
            .spec
            .aggregates
            .iter()
            .map(|a| Ok(a.state_fields()?.len()))
            .collect::<Result<Vec<_>>>()?;
        if sessions.num_columns() != key_count + 2 + state_counts.iter().sum::<usize>()
            || emitted.num_columns() != key_count + 1
        {
            return Err(Error::Execution(
                "session state does not match this query's keys and aggregates".into(),
            ));
        }
        let int64 = |batch: &RecordBatch, i: usize| -> Result<arrow::array::Int64Array> {
            batch
                .column(i)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .cloned()
                .ok_or_else(|| Error::Execution("session state: bad column type".into()))
        };
        // Keys that emitted a session first, so that open sessions find their entry.
        let rows = self
            .converter
            .convert_columns(&emitted.columns()[..key_count])?;
        let ends = int64(emitted, key_count)?;
        let mut idle = Vec::new();
        for (row, end) in rows.iter().zip(ends.values()) {
            let key: Arc<[u8]> = Arc::from(row.as_ref());
            self.keys.insert(
                key.clone(),
                KeySessions {
                    open: Vec::new(),
                    emitted_end: *end,
                },
            );
            idle.push((*end, key));
        }
        let rows = self
            .converter
            .convert_columns(&sessions.columns()[..key_count])?;
        let (starts, lasts) = (int64(sessions, key_count)?, int64(sessions, key_count + 1)?);
        let mut touched = Vec::with_capacity(rows.num_rows());
        for (i, row) in rows.iter().enumerate() {
            let mut at = key_count + 2;
            let mut accumulators = Vec::with_capacity(state_counts.len());
            for (a, &n) in self.spec.aggregates.iter().zip(&state_counts) {
                let states: Vec<ArrayRef> = sessions.columns()[at..at + n]
                    .iter()
                    .map(|c| c.slice(i, 1))
                    .collect();
                at += n;
                let mut acc = a.create_accumulator()?;
                acc.merge_batch(&states)?;
                accumulators.push(acc);
            }
            let key: Arc<[u8]> = Arc::from(row.as_ref());
            let slot = self.slab.insert(Session {
                key: key.clone(),
                start: starts.value(i),
                last: lasts.value(i),
                indexed: None,
                accumulators,
            });
            let entry = self.keys.entry(key).or_insert(KeySessions {
                open: Vec::new(),
                emitted_end: i64::MIN,
            });
            entry.open.push(slot);
            touched.push(slot);
        }
        for entry in self.keys.values_mut() {
            let slab = &self.slab;
            entry.open.sort_by_key(|&slot| {
                slab.sessions
                    .get(slot)
                    .and_then(Option::as_ref)
                    .map_or(i64::MAX, |s| s.start)
            });
        }
        // Keys with no open session wait to be forgotten, oldest first.
        idle.retain(|(_, key)| self.keys.get(key).is_some_and(|k| k.open.is_empty()));
        idle.sort_by_key(|(end, _)| *end);
        self.idle = idle.into();
        self.reindex(&touched)?;
        self.watermark = meta.watermark;
        self.forwarded = meta.forwarded;
        self.late.count = meta.late;
        Ok(())
    }

    fn state_report(&self) -> Option<StateReport> {
        Some(StateReport {
            open_windows: self.by_end.len(),
            keys: self.keys.len(),
            bytes: self.state_bytes(),
            late_dropped: self.late.count,
            emit_lag_ms: self.last_emit_lag,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{Step, assert_restores, batch, drain, input_schema, spec};
    use super::*;

    #[test]
    fn sessions_resume_from_a_snapshot_as_if_never_interrupted() {
        let script = vec![
            Step::Batch(batch(&[(1, 1.0, 0), (2, 2.0, 300), (1, 3.0, 800)])),
            Step::Watermark(1000),
            // Opens k1 [2500, ..) then bridges it to [0, 1800) with 1700.
            Step::Batch(batch(&[(1, 4.0, 2500), (1, 5.0, 1700), (3, 1.0, 1200)])),
            Step::Watermark(2400),
            // k2's session closed at 1300: 1250 is late for it.
            Step::Batch(batch(&[(2, 9.0, 1250), (2, 6.0, 4000)])),
            Step::Watermark(3600),
            Step::Batch(batch(&[(1, 7.0, 4100)])),
        ];
        assert_restores(|| Box::new(operator(1000, 0)), &script);
        assert_restores(|| Box::new(operator(1000, 800)), &script);
    }

    fn operator(gap: i64, allowed_lateness: i64) -> SessionAggregate {
        SessionAggregate::try_new(
            spec(WindowKind::Session { gap }, allowed_lateness),
            &input_schema(),
        )
        .expect("operator")
    }

    /// The `| start | end | k | n | total |` rows of a drained table.
    fn rows(table: &str) -> Vec<&str> {
        table.lines().filter(|l| l.starts_with("| 19")).collect()
    }

    #[test]
    fn sessions_split_on_the_gap_and_close_when_the_watermark_passes_their_end() {
        let mut op = operator(1000, 0);
        let mut out = Vec::new();
        op.process_batch(
            batch(&[(1, 1.0, 0), (2, 2.0, 300), (1, 3.0, 800), (1, 4.0, 2000)]),
            &mut out,
        )
        .expect("batch");
        assert_eq!(
            op.open_sessions(),
            3,
            "k1 [0, 1800), k1 [2000, 3000), k2 [300, 1300)"
        );
        op.on_watermark(Watermark(1800), &mut out)
            .expect("watermark");
        let (table, marks) = drain(&mut out);
        assert_eq!(
            rows(&table),
            vec![
                "| 1970-01-01T00:00:00     | 1970-01-01T00:00:01.800 | 1 | 2 | 4.0   |",
                "| 1970-01-01T00:00:00.300 | 1970-01-01T00:00:01.300 | 2 | 1 | 2.0   |",
            ]
        );
        assert_eq!(
            marks,
            vec![800],
            "held back by the gap (the open session starts at 2000)"
        );
        op.on_end(&mut out).expect("end");
        let (table, _) = drain(&mut out);
        assert_eq!(
            rows(&table),
            vec!["| 1970-01-01T00:00:02 | 1970-01-01T00:00:03 | 1 | 1 | 4.0   |"]
        );
        assert_eq!(op.open_sessions(), 0);
    }

    #[test]
    fn a_record_bridging_two_sessions_merges_them_within_and_across_batches() {
        let mut op = operator(1000, 0);
        let mut out = Vec::new();
        op.process_batch(batch(&[(1, 1.0, 0), (1, 2.0, 2500)]), &mut out)
            .expect("batch");
        op.process_batch(batch(&[(1, 4.0, 900)]), &mut out)
            .expect("batch");
        assert_eq!(op.open_sessions(), 2, "[0, 1900) and [2500, 3500)");
        // 2600 extends the second session; then [1700, 2700) reaches both: they merge, and
        // the row of this batch already assigned to the second goes to the merged one.
        op.process_batch(batch(&[(1, 8.0, 2600), (1, 16.0, 1700)]), &mut out)
            .expect("batch");
        assert_eq!(op.open_sessions(), 1);
        op.on_end(&mut out).expect("end");
        let (table, _) = drain(&mut out);
        assert_eq!(
            rows(&table),
            vec!["| 1970-01-01T00:00:00 | 1970-01-01T00:00:03.600 | 1 | 5 | 31.0  |"]
        );
    }

    #[test]
    fn late_records_are_dropped_and_counted_and_change_nothing() {
        let mut op = operator(1000, 0);
        let mut out = Vec::new();
        op.process_batch(batch(&[(1, 1.0, 0), (2, 1.0, 500)]), &mut out)
            .expect("batch");
        op.on_watermark(Watermark(1200), &mut out)
            .expect("watermark");
        let (table, _) = drain(&mut out);
        assert_eq!(
            rows(&table).len(),
            1,
            "k1 [0, 1000) emitted; k2 [500, 1500) open"
        );
        // k1 @100 and k2 @150: their windows [100, 1100) and [150, 1150) have closed.
        // k1 @1100 is past the end of k1's emitted session: a new one. k2 @900 joins the open
        // k2 session.
        op.process_batch(
            batch(&[(1, 9.0, 100), (1, 2.0, 1100), (2, 2.0, 900), (2, 9.0, 150)]),
            &mut out,
        )
        .expect("batch");
        assert_eq!(op.late_dropped(), 2);
        op.on_end(&mut out).expect("end");
        let (table, _) = drain(&mut out);
        assert_eq!(
            rows(&table),
            vec![
                "| 1970-01-01T00:00:00.500 | 1970-01-01T00:00:01.900 | 2 | 2 | 3.0   |",
                "| 1970-01-01T00:00:01.100 | 1970-01-01T00:00:02.100 | 1 | 1 | 2.0   |",
            ]
        );
    }

    #[test]
    fn a_record_before_the_end_of_its_keys_emitted_session_is_late() {
        // Allowed lateness 500: [0, 1000) closes at watermark 1500.
        let mut op = operator(1000, 500);
        let mut out = Vec::new();
        op.process_batch(batch(&[(1, 1.0, 0)]), &mut out)
            .expect("batch");
        op.on_watermark(Watermark(1500), &mut out)
            .expect("watermark");
        let (table, _) = drain(&mut out);
        assert_eq!(rows(&table).len(), 1);
        // @900: its own window [900, 1900) is open (1900 + 500 > 1500), but it falls in the
        // emitted session: late. @1000 starts a new one.
        op.process_batch(batch(&[(1, 2.0, 900), (1, 4.0, 1000)]), &mut out)
            .expect("batch");
        assert_eq!(op.late_dropped(), 1);
        op.on_watermark(Watermark(10_000), &mut out)
            .expect("watermark");
        let (table, _) = drain(&mut out);
        assert_eq!(
            rows(&table),
            vec!["| 1970-01-01T00:00:01 | 1970-01-01T00:00:02 | 1 | 1 | 4.0   |"]
        );
        assert!(
            op.keys.is_empty(),
            "a key is forgotten once no record on time can reach its last session"
        );
    }
}
