//! [`WindowAggregate`]: `GROUP BY` over TUMBLE and HOP windows, incremental and Arrow-batched.
//!
//! Every record updates exactly one **pane**: the slide-aligned interval holding its event
//! time (for TUMBLE the pane is the window). A pane's groups are interned with DataFusion's
//! [`GroupValues`] (one hash pass per batch) and aggregated with each aggregate's
//! [`GroupsAccumulator`] where it has one, its row [`Accumulator`] otherwise.
//!
//! - TUMBLE: when the watermark passes `window_end + allowed_lateness`, the pane is evaluated
//!   and freed.
//! - HOP: when the watermark passes a pane's end (plus lateness) the pane is frozen into its
//!   aggregate *states*; a window is then the merge of its `size / slide` frozen panes, so a
//!   10 s window sliding every 1 s costs one update per record, not ten. A frozen pane is
//!   freed once the last window holding it has been emitted.
//!
//! A record whose pane has already closed is late: it is dropped and counted, and changes
//! nothing. Each window's rows are emitted once. The watermark passed downstream is held back
//! by `size + allowed_lateness`, so that every row emitted later (whose `window_start` is
//! past it) is on time for a window downstream (a 1-minute view rolled up into hours).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, UInt32Array};
use arrow::compute::{cast, take};
use arrow::datatypes::{
    DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit, TimestampMillisecondType,
};
use arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{Accumulator, EmitTo, GroupsAccumulator};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;

use super::session::SessionAggregate;
use crate::checkpoint::Snapshot;
use crate::error::{Error, Result};
use crate::message::{CheckpointBarrier, Message, Watermark};
use crate::operator::{Operator, StateReport};

/// The window of a windowed aggregation, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    Tumble {
        size: i64,
    },
    Hop {
        size: i64,
        slide: i64,
    },
    /// One session per key: records less than `gap` apart belong to one window.
    Session {
        gap: i64,
    },
}

impl WindowKind {
    /// The window length; for a session, the gap (a session is at least that long).
    fn size(self) -> i64 {
        match self {
            Self::Tumble { size } | Self::Hop { size, .. } => size,
            Self::Session { gap } => gap,
        }
    }

    /// The pane length: the slide (for TUMBLE, the size).
    fn slide(self) -> i64 {
        match self {
            Self::Tumble { size } => size,
            Self::Hop { slide, .. } => slide,
            Self::Session { gap } => gap,
        }
    }
}

/// The operator computing `spec`: panes for TUMBLE and HOP, sessions for SESSION.
pub fn window_operator(
    spec: Arc<WindowAggregateSpec>,
    input_schema: &Schema,
) -> Result<Box<dyn Operator>> {
    Ok(match spec.kind {
        WindowKind::Session { .. } => Box::new(SessionAggregate::try_new(spec, input_schema)?),
        _ => Box::new(WindowAggregate::try_new(spec, input_schema)?),
    })
}

/// The window's time column as millisecond timestamps: the event time, or the wall clock
/// for processing-time windows.
pub(super) fn event_times(
    spec: &WindowAggregateSpec,
    batch: &RecordBatch,
) -> Result<arrow::array::TimestampMillisecondArray> {
    let rows = batch.num_rows();
    let time = if spec.processing_time {
        ScalarValue::TimestampMillisecond(Some(now_ms()), None).to_array_of_size(rows)?
    } else {
        spec.time.evaluate(batch)?.into_array(rows)?
    };
    let time = cast(&time, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
    Ok(time.as_primitive::<TimestampMillisecondType>().clone())
}

/// Each aggregate's input expressions.
pub(super) type AggregateArguments = Vec<Vec<Arc<dyn PhysicalExpr>>>;

/// Checks the time column's type; the key columns' schema (one constant column when there
/// are no keys); each aggregate's arguments followed by its `ORDER BY` expressions
/// (`first_value(v ORDER BY ts)` orders by what it is given), as DataFusion feeds them.
pub(super) fn prepare(
    spec: &WindowAggregateSpec,
    input_schema: &Schema,
) -> Result<(SchemaRef, AggregateArguments)> {
    let mut fields = spec
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            Ok(Field::new(
                format!("k{i}"),
                k.data_type(input_schema)?,
                true,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    if fields.is_empty() {
        fields.push(Field::new("k", DataType::Boolean, true));
    }
    match spec.time.data_type(input_schema)? {
        DataType::Timestamp(..) => {}
        other => {
            return Err(Error::Execution(format!(
                "the window's time column must be a TIMESTAMP, not {other}"
            )));
        }
    }
    let arguments = spec
        .aggregates
        .iter()
        .map(|a| {
            let mut exprs = a.expressions();
            exprs.extend(a.order_bys().iter().map(|o| o.expr.clone()));
            exprs
        })
        .collect();
    Ok((Arc::new(Schema::new(fields)), arguments))
}

/// The key columns of `batch` (one constant column when there are no keys).
pub(super) fn key_columns(
    spec: &WindowAggregateSpec,
    batch: &RecordBatch,
) -> Result<Vec<ArrayRef>> {
    if spec.keys.is_empty() {
        return Ok(vec![Arc::new(BooleanArray::from(vec![
            true;
            batch.num_rows()
        ]))]);
    }
    spec.keys
        .iter()
        .map(|k| Ok(k.evaluate(batch)?.into_array(batch.num_rows())?))
        .collect()
}

/// Each aggregate's input columns and `FILTER` over `batch`.
pub(super) type AggregateInputs = (Vec<Vec<ArrayRef>>, Vec<Option<BooleanArray>>);

pub(super) fn aggregate_inputs(
    spec: &WindowAggregateSpec,
    arguments: &[Vec<Arc<dyn PhysicalExpr>>],
    batch: &RecordBatch,
) -> Result<AggregateInputs> {
    let rows = batch.num_rows();
    let mut inputs = Vec::with_capacity(spec.aggregates.len());
    let mut filters = Vec::with_capacity(spec.aggregates.len());
    for (arguments, filter) in arguments.iter().zip(&spec.filters) {
        inputs.push(
            arguments
                .iter()
                .map(|e| Ok(e.evaluate(batch)?.into_array(rows)?))
                .collect::<Result<Vec<_>>>()?,
        );
        filters.push(match filter {
            Some(f) => Some(f.evaluate(batch)?.into_array(rows)?.as_boolean().clone()),
            None => None,
        });
    }
    Ok((inputs, filters))
}

/// One output column of the `GROUP BY`, in the order the plan lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupColumn {
    WindowStart,
    WindowEnd,
    /// The i-th key expression.
    Key(usize),
}

/// What a windowed aggregation computes (shared by every pipeline running it).
#[derive(Debug, Clone)]
pub struct WindowAggregateSpec {
    pub kind: WindowKind,
    /// The event-time column, over the input.
    pub time: Arc<dyn PhysicalExpr>,
    /// The `GROUP BY` expressions other than the window's columns, over the input.
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    pub aggregates: Vec<Arc<AggregateFunctionExpr>>,
    /// `FILTER (WHERE ...)` of each aggregate, over the input.
    pub filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    /// The group columns of the output, in order; the aggregates follow them.
    pub group_columns: Vec<GroupColumn>,
    /// Rows emitted: the group columns, then one column per aggregate.
    pub schema: SchemaRef,
    pub allowed_lateness: i64,
    /// The stream has no WATERMARK: rows fall in the window of their arrival on the wall
    /// clock, and windows close on the wall clock (ticks), not on watermarks.
    pub processing_time: bool,
}

/// Where a [`WindowAggregate`] sits when the aggregation is split in two around a shuffle
/// (a cluster's repartition topic), as Flink's two-phase aggregation and DataFusion's
/// `AggregateMode::Partial` / `Final` split it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Rows in, windows out.
    Whole,
    /// Rows in; at every barrier and at the end, every pane's accumulator states out (one
    /// row per pane and key, laid out as [`partial_schema`] says), and nothing kept. Windows
    /// are never closed here: the watermark passes through.
    Partial,
    /// [`Phase::Partial`]'s rows in (merged per pane and key), windows out.
    Final,
}

/// The rows a [`Phase::Partial`] window emits for `spec` over `input_schema`: `__pane` (the
/// pane's start, ms), the key columns (`k0`, ...; one constant `k` without keys), then each
/// aggregate's state columns (`a0_0`, ...).
pub fn partial_schema(spec: &WindowAggregateSpec, input_schema: &Schema) -> Result<SchemaRef> {
    let (key_schema, _) = prepare(spec, input_schema)?;
    let mut fields = vec![Field::new(PANE_COLUMN, DataType::Int64, false)];
    fields.extend(key_schema.fields().iter().map(|f| f.as_ref().clone()));
    for (a, aggregate) in spec.aggregates.iter().enumerate() {
        for (j, state) in aggregate.state_fields()?.iter().enumerate() {
            fields.push(Field::new(
                format!("a{a}_{j}"),
                state.data_type().clone(),
                true,
            ));
        }
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// The first column of a partial row: the start of its pane.
const PANE_COLUMN: &str = "__pane";

/// A running windowed aggregation (one per pipeline).
pub struct WindowAggregate {
    spec: Arc<WindowAggregateSpec>,
    phase: Phase,
    /// [`Phase::Partial`]: the rows it emits.
    partial_schema: SchemaRef,
    /// The key columns' types, for [`new_group_values`]; one constant column when there are
    /// no keys (`GROUP BY window_start` alone).
    key_schema: SchemaRef,
    /// Open panes by start.
    panes: BTreeMap<i64, Pane>,
    /// HOP: frozen panes by start.
    frozen: BTreeMap<i64, FrozenPane>,
    /// HOP: windows ending at or before this have been emitted.
    emitted_until: i64,
    watermark: Option<i64>,
    late: LateRecords,
    group_ids: Vec<usize>,
    /// Each aggregate's input expressions, followed by its `ORDER BY` expressions
    /// (`first_value(v ORDER BY ts)` orders by what it is given), as DataFusion's own
    /// aggregation feeds them.
    arguments: AggregateArguments,
    /// Watermark minus the end of the last window emitted, when it was emitted.
    last_emit_lag: Option<i64>,
}

/// Records dropped because their window had closed (or they had no event time): counted,
/// and logged at a bounded rate.
pub(super) struct LateRecords {
    pub(super) count: u64,
    log: crate::pipeline::RateLimitedLog,
}

impl Default for LateRecords {
    fn default() -> Self {
        Self {
            count: 0,
            log: crate::pipeline::RateLimitedLog::new(std::time::Duration::from_secs(10)),
        }
    }
}

impl LateRecords {
    pub(super) fn dropped(&mut self, late: u64, watermark: Option<i64>) {
        if late == 0 {
            return;
        }
        self.count += late;
        let total = self.count;
        self.log.log(|suppressed| {
            tracing::warn!(
                late,
                total,
                watermark,
                suppressed,
                "records for windows already closed (or without an event time) were dropped"
            );
        });
    }
}

/// A pane's start and its rows of a batch (`None`: all of them).
type PaneRows = (i64, Option<Vec<u32>>);

struct Pane {
    groups: Box<dyn GroupValues>,
    accumulators: Vec<PaneAccumulator>,
}

enum PaneAccumulator {
    Groups(Box<dyn GroupsAccumulator>),
    /// One row accumulator per group, for aggregates without a groups accumulator.
    Rows(Vec<Box<dyn Accumulator>>),
}

/// A closed HOP pane: its keys and each aggregate's state columns, one row per group.
struct FrozenPane {
    keys: Vec<ArrayRef>,
    states: Vec<Vec<ArrayRef>>,
}

impl FrozenPane {
    /// One batch: the keys (`k0`, ...), then each aggregate's states (`a0_0`, ...).
    fn to_batch(&self) -> Result<RecordBatch> {
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        for (i, key) in self.keys.iter().enumerate() {
            fields.push(Field::new(format!("k{i}"), key.data_type().clone(), true));
            columns.push(key.clone());
        }
        for (a, states) in self.states.iter().enumerate() {
            for (j, state) in states.iter().enumerate() {
                fields.push(Field::new(
                    format!("a{a}_{j}"),
                    state.data_type().clone(),
                    true,
                ));
                columns.push(state.clone());
            }
        }
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns,
        )?)
    }

    /// The inverse of [`FrozenPane::to_batch`], given the number of key columns and of each
    /// aggregate's state columns.
    fn from_batch(batch: &RecordBatch, keys: usize, states: &[usize]) -> Result<Self> {
        if batch.num_columns() != keys + states.iter().sum::<usize>() {
            return Err(Error::Execution(format!(
                "window state has {} columns where this query keeps {}",
                batch.num_columns(),
                keys + states.iter().sum::<usize>()
            )));
        }
        let columns = batch.columns();
        let mut at = keys;
        let states = states
            .iter()
            .map(|&n| {
                let state = columns[at..at + n].to_vec();
                at += n;
                state
            })
            .collect();
        Ok(Self {
            keys: columns[..keys].to_vec(),
            states,
        })
    }
}

/// The JSON part of a window's snapshot.
#[derive(serde::Deserialize)]
struct WindowMeta {
    watermark: Option<i64>,
    emitted_until: i64,
    late: u64,
    panes: Vec<PaneMeta>,
}

#[derive(serde::Deserialize)]
struct PaneMeta {
    start: i64,
    frozen: bool,
}

impl WindowAggregate {
    pub fn try_new(spec: Arc<WindowAggregateSpec>, input_schema: &Schema) -> Result<Self> {
        Self::with_phase(spec, input_schema, Phase::Whole)
    }

    /// One phase of the aggregation `spec`, whose rows are over `input_schema` (for
    /// [`Phase::Final`] too: its own input is the partial phase's output). Processing-time
    /// windows do not split: their panes follow each process's clock.
    pub fn with_phase(
        spec: Arc<WindowAggregateSpec>,
        input_schema: &Schema,
        phase: Phase,
    ) -> Result<Self> {
        if phase != Phase::Whole && spec.processing_time {
            return Err(Error::Internal(
                "a processing-time window does not split in two phases".into(),
            ));
        }
        if matches!(spec.kind, WindowKind::Session { .. }) {
            return Err(Error::Internal(
                "session windows are computed by SessionAggregate".into(),
            ));
        }
        let (key_schema, arguments) = prepare(&spec, input_schema)?;
        Ok(Self {
            phase,
            partial_schema: partial_schema(&spec, input_schema)?,
            last_emit_lag: None,
            late: LateRecords::default(),
            arguments,
            key_schema,
            spec,
            panes: BTreeMap::new(),
            frozen: BTreeMap::new(),
            emitted_until: i64::MIN,
            watermark: None,
            group_ids: Vec::new(),
        })
    }

    /// Records dropped because their window had closed.
    pub fn late_dropped(&self) -> u64 {
        self.late.count
    }

    /// Estimated bytes held: interned keys, accumulators, frozen pane states.
    pub fn state_bytes(&self) -> usize {
        let open: usize = self
            .panes
            .values()
            .map(|p| {
                p.groups.size()
                    + p.accumulators
                        .iter()
                        .map(|a| match a {
                            PaneAccumulator::Groups(a) => a.size(),
                            PaneAccumulator::Rows(accs) => accs.iter().map(|a| a.size()).sum(),
                        })
                        .sum::<usize>()
            })
            .sum();
        let frozen: usize = self
            .frozen
            .values()
            .flat_map(|f| f.keys.iter().chain(f.states.iter().flatten()))
            .map(|a| a.get_array_memory_size())
            .sum();
        open + frozen
    }

    /// Windows holding rows that have not been emitted yet.
    fn open_windows(&self) -> usize {
        let (size, slide) = (self.spec.kind.size(), self.spec.kind.slide());
        let mut ends: Vec<i64> = self
            .panes
            .keys()
            .chain(self.frozen.keys())
            .flat_map(|&p| (1..=size / slide).map(move |i| p + i * slide))
            .filter(|&end| end > self.emitted_until)
            .collect();
        ends.sort_unstable();
        ends.dedup();
        ends.len()
    }

    /// Open windows' groups held in state (keys × panes, summed over panes).
    pub fn groups_in_state(&self) -> usize {
        self.panes.values().map(|p| p.groups.len()).sum::<usize>()
            + self
                .frozen
                .values()
                .map(|f| f.keys.first().map_or(0, |k| k.len()))
                .sum::<usize>()
    }

    fn new_pane(&self) -> Result<Pane> {
        let groups = new_group_values(self.key_schema.clone(), &GroupOrdering::None)?;
        let accumulators = self
            .spec
            .aggregates
            .iter()
            .map(|a| {
                Ok(if a.groups_accumulator_supported() {
                    PaneAccumulator::Groups(a.create_groups_accumulator()?)
                } else {
                    PaneAccumulator::Rows(Vec::new())
                })
            })
            .collect::<Result<_>>()?;
        Ok(Pane {
            groups,
            accumulators,
        })
    }

    /// Adds rows to a pane: `keys`, each aggregate's inputs and filter, all of one length.
    fn update_pane(
        &mut self,
        start: i64,
        keys: &[ArrayRef],
        inputs: &[Vec<ArrayRef>],
        filters: &[Option<BooleanArray>],
    ) -> Result<()> {
        if !self.panes.contains_key(&start) {
            let pane = self.new_pane()?;
            self.panes.insert(start, pane);
        }
        let Some(pane) = self.panes.get_mut(&start) else {
            return Err(Error::Internal("pane vanished".into()));
        };
        pane.groups.intern(keys, &mut self.group_ids)?;
        let groups = pane.groups.len();
        for (i, acc) in pane.accumulators.iter_mut().enumerate() {
            match acc {
                PaneAccumulator::Groups(acc) => {
                    acc.update_batch(&inputs[i], &self.group_ids, filters[i].as_ref(), groups)?;
                }
                PaneAccumulator::Rows(accs) => {
                    while accs.len() < groups {
                        accs.push(self.spec.aggregates[i].create_accumulator()?);
                    }
                    update_rows(accs, &inputs[i], &self.group_ids, filters[i].as_ref())?;
                }
            }
        }
        Ok(())
    }

    /// Emits what the watermark `mark` closes (all of it when `mark` is `i64::MAX`).
    fn close(&mut self, mark: i64, out: &mut Vec<Message>) -> Result<()> {
        let kind = self.spec.kind;
        let (size, slide) = (kind.size(), kind.slide());
        let lateness = self.spec.allowed_lateness;
        let closes = |end: i64| mark == i64::MAX || end.saturating_add(lateness) <= mark;
        let closing: Vec<i64> = self
            .panes
            .keys()
            .copied()
            .take_while(|&start| closes(start + slide))
            .collect();
        match kind {
            // (SESSION never gets here: `try_new` refuses it.)
            WindowKind::Tumble { .. } | WindowKind::Session { .. } => {
                for start in closing {
                    if let Some(pane) = self.panes.remove(&start) {
                        let batch = self.evaluate(pane, start, start + size)?;
                        out.push(Message::Data(batch));
                        self.last_emit_lag = Some(mark.saturating_sub(start + size));
                    }
                }
            }
            WindowKind::Hop { .. } => {
                for start in closing {
                    if let Some(pane) = self.panes.remove(&start) {
                        let frozen = freeze(pane, &self.spec.aggregates)?;
                        self.frozen.insert(start, frozen);
                    }
                }
                // Windows holding a frozen pane, ending after the last emitted one.
                let mut ends: Vec<i64> = self
                    .frozen
                    .keys()
                    .flat_map(|&p| (1..=size / slide).map(move |i| p + i * slide))
                    .filter(|&end| end > self.emitted_until && closes(end))
                    .collect();
                ends.sort_unstable();
                ends.dedup();
                for end in ends {
                    let batch = self.merge_window(end - size, end)?;
                    out.push(Message::Data(batch));
                    self.emitted_until = end;
                    self.last_emit_lag = Some(mark.saturating_sub(end));
                }
                // A pane is needed until the last window holding it (ending at start + size).
                let emitted = self.emitted_until;
                self.frozen.retain(|&start, _| start + size > emitted);
            }
        }
        Ok(())
    }

    /// A tumbling window's rows, straight from its pane.
    fn evaluate(&self, mut pane: Pane, start: i64, end: i64) -> Result<RecordBatch> {
        let keys = pane.groups.emit(EmitTo::All)?;
        let rows = keys.first().map_or(0, |k| k.len());
        let values = pane
            .accumulators
            .iter_mut()
            .map(|acc| match acc {
                PaneAccumulator::Groups(acc) => Ok(acc.evaluate(EmitTo::All)?),
                PaneAccumulator::Rows(accs) => {
                    let values = accs
                        .iter_mut()
                        .map(|a| a.evaluate())
                        .collect::<datafusion::error::Result<Vec<_>>>()?;
                    Ok(ScalarValue::iter_to_array(values)?)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let bounds = |ms| ScalarValue::TimestampMillisecond(Some(ms), None).to_array_of_size(rows);
        lay_out(&self.spec, keys, values, rows, bounds(start)?, bounds(end)?)
    }

    /// A hopping window's rows: its frozen panes' states merged.
    fn merge_window(&self, start: i64, end: i64) -> Result<RecordBatch> {
        let mut pane = self.new_pane()?;
        let mut ids = Vec::new();
        for frozen in self.frozen.range(start..end).map(|(_, f)| f) {
            self.merge_into(&mut pane, frozen, &mut ids)?;
        }
        self.evaluate(pane, start, end)
    }

    /// Adds a frozen pane's groups and states to `pane`.
    fn merge_into(&self, pane: &mut Pane, frozen: &FrozenPane, ids: &mut Vec<usize>) -> Result<()> {
        pane.groups.intern(&frozen.keys, ids)?;
        let groups = pane.groups.len();
        for (i, acc) in pane.accumulators.iter_mut().enumerate() {
            let states = &frozen.states[i];
            match acc {
                PaneAccumulator::Groups(acc) => acc.merge_batch(states, ids, groups)?,
                PaneAccumulator::Rows(accs) => {
                    while accs.len() < groups {
                        accs.push(self.spec.aggregates[i].create_accumulator()?);
                    }
                    merge_rows(accs, states, ids)?;
                }
            }
        }
        Ok(())
    }

    /// A pane rebuilt from its frozen form: the same groups, in the same order.
    fn thaw(&self, frozen: &FrozenPane) -> Result<Pane> {
        let mut pane = self.new_pane()?;
        self.merge_into(&mut pane, frozen, &mut Vec::new())?;
        Ok(pane)
    }

    /// Each pane's rows, `None` meaning the whole batch (the common case: no index list is
    /// built), and the number of rows dropped: late ones, those without a time, and those
    /// so near the ends of the timestamp range (hundreds of millions of years away) that
    /// their windows' bounds cannot be represented.
    fn assign_panes(&self, time: &arrow::array::TimestampMillisecondArray) -> (Vec<PaneRows>, u64) {
        let (slide, size) = (self.spec.kind.slide(), self.spec.kind.size());
        let lateness = self.spec.allowed_lateness;
        let pane = |t: Option<i64>| {
            // Every bound computed later lies between the pane's start and its last window's
            // end (start + size).
            let start = t?.div_euclid(slide).checked_mul(slide)?;
            start.checked_add(size)?;
            let next = start.checked_add(slide)?;
            let late = self
                .watermark
                .is_some_and(|w| next.saturating_add(lateness) <= w);
            (!late).then_some(start)
        };
        let mut late = 0u64;
        let mut only: Option<i64> = None;
        let mut one_pane = true;
        for t in time.iter() {
            match pane(t) {
                None => late += 1,
                Some(start) => {
                    one_pane &= only.is_none_or(|o| o == start);
                    only = Some(start);
                }
            }
        }
        if late == 0 && one_pane {
            return (only.map(|start| (start, None)).into_iter().collect(), 0);
        }
        let mut by_pane: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        for (row, t) in time.iter().enumerate() {
            if let Some(start) = pane(t) {
                by_pane.entry(start).or_default().push(row as u32);
            }
        }
        (
            by_pane
                .into_iter()
                .map(|(start, rows)| (start, Some(rows)))
                .collect(),
            late,
        )
    }
}

impl WindowAggregate {
    /// [`Phase::Partial`]: every pane's states out, one batch per pane, and the panes gone.
    fn emit_partials(&mut self, out: &mut Vec<Message>) -> Result<()> {
        for (start, pane) in std::mem::take(&mut self.panes) {
            let frozen = freeze(pane, &self.spec.aggregates)?;
            let rows = frozen.keys.first().map_or(0, |k| k.len());
            if rows == 0 {
                continue;
            }
            let mut columns: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(vec![start; rows]))];
            columns.extend(frozen.keys);
            columns.extend(frozen.states.into_iter().flatten());
            let columns = columns
                .into_iter()
                .zip(self.partial_schema.fields())
                .map(|(c, f)| {
                    if c.data_type() == f.data_type() {
                        Ok(c)
                    } else {
                        Ok(cast(&c, f.data_type())?)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            out.push(Message::Data(RecordBatch::try_new(
                self.partial_schema.clone(),
                columns,
            )?));
        }
        Ok(())
    }

    /// [`Phase::Final`]: merges partial rows into their panes. Rows of a pane the watermark
    /// has closed are late, as records would be.
    fn merge_partials(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_columns() != self.partial_schema.fields().len() {
            return Err(Error::Execution(format!(
                "partial window rows have {} columns where this query keeps {}",
                batch.num_columns(),
                self.partial_schema.fields().len()
            )));
        }
        let starts = batch
            .column(0)
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| Error::Execution("partial window rows without a pane start".into()))?
            .clone();
        let mut by_pane: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        let first = (!starts.is_empty()).then(|| starts.value(0));
        let one_pane =
            starts.null_count() == 0 && starts.values().iter().all(|&s| Some(s) == first);
        if !one_pane {
            for (row, start) in starts.iter().enumerate() {
                let start = start.ok_or_else(|| {
                    Error::Execution("partial window rows without a pane start".into())
                })?;
                by_pane.entry(start).or_default().push(row as u32);
            }
        }
        let panes: Vec<(i64, Option<Vec<u32>>)> = match first {
            Some(start) if one_pane => vec![(start, None)],
            _ => by_pane
                .into_iter()
                .map(|(s, rows)| (s, Some(rows)))
                .collect(),
        };
        let keys = self.key_schema.fields().len();
        let states = self
            .spec
            .aggregates
            .iter()
            .map(|a| Ok(a.state_fields()?.len()))
            .collect::<Result<Vec<_>>>()?;
        let body = batch.project(&(1..batch.num_columns()).collect::<Vec<_>>())?;
        let (slide, lateness) = (self.spec.kind.slide(), self.spec.allowed_lateness);
        let mut ids = Vec::new();
        for (start, rows) in panes {
            let count = rows.as_ref().map_or(batch.num_rows(), Vec::len);
            let late = self
                .watermark
                .is_some_and(|w| start.saturating_add(slide).saturating_add(lateness) <= w);
            if late {
                self.late.dropped(count as u64, self.watermark);
                continue;
            }
            let part = match rows {
                None => body.clone(),
                Some(rows) => {
                    let indices = UInt32Array::from(rows);
                    let columns = body
                        .columns()
                        .iter()
                        .map(|c| take(c, &indices, None))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    RecordBatch::try_new(body.schema(), columns)?
                }
            };
            let frozen = FrozenPane::from_batch(&part, keys, &states)?;
            let mut pane = match self.panes.remove(&start) {
                Some(pane) => pane,
                None => self.new_pane()?,
            };
            self.merge_into(&mut pane, &frozen, &mut ids)?;
            self.panes.insert(start, pane);
        }
        Ok(())
    }
}

impl Operator for WindowAggregate {
    fn name(&self) -> &'static str {
        match self.phase {
            Phase::Whole => "window_aggregate",
            Phase::Partial => "window_partial",
            Phase::Final => "window_final",
        }
    }

    fn process_batch(&mut self, batch: RecordBatch, _out: &mut Vec<Message>) -> Result<()> {
        if self.phase == Phase::Final {
            return self.merge_partials(batch);
        }
        let time = event_times(&self.spec, &batch)?;
        let (panes, late) = self.assign_panes(&time);
        self.late.dropped(late, self.watermark);
        if panes.is_empty() {
            return Ok(());
        }
        let keys = key_columns(&self.spec, &batch)?;
        let (inputs, filters) = aggregate_inputs(&self.spec, &self.arguments, &batch)?;
        for (start, indices) in panes {
            let Some(indices) = indices else {
                self.update_pane(start, &keys, &inputs, &filters)?;
                continue;
            };
            let indices = UInt32Array::from(indices);
            let pick = |columns: &[ArrayRef]| -> Result<Vec<ArrayRef>> {
                columns
                    .iter()
                    .map(|c| Ok(take(c, &indices, None)?))
                    .collect()
            };
            let keys = pick(&keys)?;
            let inputs = inputs.iter().map(|i| pick(i)).collect::<Result<Vec<_>>>()?;
            let filters = filters
                .iter()
                .map(|f| match f {
                    Some(f) => Ok(Some(take(f, &indices, None)?.as_boolean().clone())),
                    None => Ok(None),
                })
                .collect::<Result<Vec<_>>>()?;
            self.update_pane(start, &keys, &inputs, &filters)?;
        }
        Ok(())
    }

    fn on_watermark(&mut self, watermark: Watermark, out: &mut Vec<Message>) -> Result<()> {
        if !advance(&mut self.watermark, &self.spec, watermark) {
            return Ok(());
        }
        if self.phase == Phase::Partial {
            // Rows keep their event time's pane: the final phase closes windows.
            out.push(Message::Watermark(watermark));
            return Ok(());
        }
        self.close(watermark.0, out)?;
        // Rows emitted later have window_start > mark - lateness - size.
        let held = watermark
            .0
            .saturating_sub(self.spec.allowed_lateness)
            .saturating_sub(self.spec.kind.size());
        out.push(Message::Watermark(Watermark(held)));
        Ok(())
    }

    fn on_barrier(&mut self, barrier: CheckpointBarrier, out: &mut Vec<Message>) -> Result<()> {
        if self.phase == Phase::Partial {
            self.emit_partials(out)?;
        }
        out.push(Message::Barrier(barrier));
        Ok(())
    }

    fn on_end(&mut self, out: &mut Vec<Message>) -> Result<()> {
        if self.phase == Phase::Partial {
            return self.emit_partials(out);
        }
        // A bounded input is complete: every open window closes (no lag to speak of).
        self.close(i64::MAX, out)?;
        self.last_emit_lag = None;
        Ok(())
    }

    fn tick_interval(&self) -> Option<std::time::Duration> {
        self.spec.processing_time.then_some(TICK)
    }

    fn on_tick(&mut self, out: &mut Vec<Message>) -> Result<()> {
        let now = now_ms();
        self.watermark = Some(now);
        self.close(now, out)?;
        // What comes after (a roll-up over window_start) runs on event time: the clock is
        // its watermark, held back as an event-time mark would be.
        let held = now
            .saturating_sub(self.spec.allowed_lateness)
            .saturating_sub(self.spec.kind.size());
        out.push(Message::Watermark(Watermark(held)));
        Ok(())
    }

    /// Every pane as one batch (keys, then each aggregate's state columns: Arrow arrays, as
    /// DataFusion's multi-phase aggregation exchanges them), with the watermark, what HOP
    /// has emitted and the late count. An open pane is frozen to read its states (which
    /// consumes them) and thawed back from the same arrays.
    fn snapshot(&mut self) -> Result<Option<Snapshot>> {
        if self.phase == Phase::Partial {
            // Its panes go out before the barrier (`on_barrier`): nothing is left to save.
            return Ok(None);
        }
        let mut panes = Vec::with_capacity(self.panes.len() + self.frozen.len());
        let mut batches = Vec::with_capacity(panes.capacity());
        for start in self.panes.keys().copied().collect::<Vec<_>>() {
            let Some(pane) = self.panes.remove(&start) else {
                continue;
            };
            let frozen = freeze(pane, &self.spec.aggregates)?;
            batches.push(frozen.to_batch()?);
            self.panes.insert(start, self.thaw(&frozen)?);
            panes.push(serde_json::json!({"start": start, "frozen": false}));
        }
        for (start, frozen) in &self.frozen {
            batches.push(frozen.to_batch()?);
            panes.push(serde_json::json!({"start": start, "frozen": true}));
        }
        let meta = serde_json::json!({
            "watermark": self.watermark,
            "emitted_until": self.emitted_until,
            "late": self.late.count,
            "panes": panes,
        });
        Ok(Some(Snapshot::new(meta, batches)))
    }

    fn restore(&mut self, snapshot: Snapshot) -> Result<()> {
        let meta: WindowMeta = serde_json::from_value(snapshot.meta)
            .map_err(|e| Error::Execution(format!("window state is unreadable: {e}")))?;
        if meta.panes.len() != snapshot.batches.len() {
            return Err(Error::Execution(
                "window state is unreadable: panes and batches differ".into(),
            ));
        }
        let keys = self.key_schema.fields().len();
        let states = self
            .spec
            .aggregates
            .iter()
            .map(|a| Ok(a.state_fields()?.len()))
            .collect::<Result<Vec<_>>>()?;
        for (pane, batch) in meta.panes.into_iter().zip(snapshot.batches) {
            let frozen = FrozenPane::from_batch(&batch, keys, &states)?;
            if pane.frozen {
                self.frozen.insert(pane.start, frozen);
            } else {
                self.panes.insert(pane.start, self.thaw(&frozen)?);
            }
        }
        self.watermark = meta.watermark;
        self.emitted_until = meta.emitted_until;
        self.late.count = meta.late;
        Ok(())
    }

    fn state_report(&self) -> Option<StateReport> {
        Some(StateReport {
            open_windows: self.open_windows(),
            keys: self.groups_in_state(),
            bytes: self.state_bytes(),
            late_dropped: self.late.count,
            emit_lag_ms: self.last_emit_lag,
        })
    }
}

/// Takes `watermark` as the operator's mark if it moves the mark on. Processing-time
/// windows ignore watermarks: the wall clock closes them.
pub(super) fn advance(
    mark: &mut Option<i64>,
    spec: &WindowAggregateSpec,
    watermark: Watermark,
) -> bool {
    if spec.processing_time || mark.is_some_and(|w| watermark.0 <= w) {
        return false;
    }
    *mark = Some(watermark.0);
    true
}

/// How often processing-time windows look at the wall clock.
pub(super) const TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// The wall clock, ms since the Unix epoch.
pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A window's rows as the plan lays them out: the group columns in order (`start` and `end`
/// are the bounds of each row's window, as millisecond timestamps), then the aggregates.
pub(super) fn lay_out(
    spec: &WindowAggregateSpec,
    keys: Vec<ArrayRef>,
    values: Vec<ArrayRef>,
    rows: usize,
    start: ArrayRef,
    end: ArrayRef,
) -> Result<RecordBatch> {
    let fields = spec.schema.fields();
    let mut columns = Vec::with_capacity(fields.len());
    for column in &spec.group_columns {
        columns.push(match column {
            GroupColumn::WindowStart => start.clone(),
            GroupColumn::WindowEnd => end.clone(),
            GroupColumn::Key(k) => keys[*k].clone(),
        });
    }
    columns.extend(values);
    // The plan's types: the bounds' precision, and aggregate results that differ only in
    // nullability.
    let columns = columns
        .into_iter()
        .zip(fields.iter())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(c)
            } else {
                Ok(cast(&c, f.data_type())?)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let options = arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows));
    Ok(RecordBatch::try_new_with_options(
        spec.schema.clone(),
        columns,
        &options,
    )?)
}

/// Updates one row accumulator per group with that group's rows.
fn update_rows(
    accs: &mut [Box<dyn Accumulator>],
    values: &[ArrayRef],
    group_ids: &[usize],
    filter: Option<&BooleanArray>,
) -> Result<()> {
    for_each_group(values, group_ids, filter, |group, rows| {
        Ok(accs[group].update_batch(rows)?)
    })
}

/// Merges state rows into one row accumulator per group.
fn merge_rows(
    accs: &mut [Box<dyn Accumulator>],
    states: &[ArrayRef],
    group_ids: &[usize],
) -> Result<()> {
    for_each_group(states, group_ids, None, |group, rows| {
        Ok(accs[group].merge_batch(rows)?)
    })
}

/// Calls `f` with each group's rows of `columns`.
fn for_each_group(
    columns: &[ArrayRef],
    group_ids: &[usize],
    filter: Option<&BooleanArray>,
    mut f: impl FnMut(usize, &[ArrayRef]) -> Result<()>,
) -> Result<()> {
    for (group, rows) in rows_by_group(group_ids, filter) {
        let indices = UInt32Array::from(rows);
        let taken = columns
            .iter()
            .map(|c| take(c, &indices, None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        f(group, &taken)?;
    }
    Ok(())
}

/// Row indices per group id (rows the filter rejects left out).
fn rows_by_group(group_ids: &[usize], filter: Option<&BooleanArray>) -> BTreeMap<usize, Vec<u32>> {
    let mut by_group: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for (row, &group) in group_ids.iter().enumerate() {
        if filter.is_some_and(|f| !f.is_valid(row) || !f.value(row)) {
            continue;
        }
        by_group.entry(group).or_default().push(row as u32);
    }
    by_group
}

/// A closed pane's keys and each aggregate's state columns.
fn freeze(mut pane: Pane, aggregates: &[Arc<AggregateFunctionExpr>]) -> Result<FrozenPane> {
    let keys = pane.groups.emit(EmitTo::All)?;
    let states = pane
        .accumulators
        .iter_mut()
        .zip(aggregates)
        .map(|(acc, aggregate)| match acc {
            PaneAccumulator::Groups(acc) => Ok(acc.state(EmitTo::All)?),
            PaneAccumulator::Rows(accs) => {
                let fields = aggregate.state_fields()?.len();
                let mut columns: Vec<Vec<ScalarValue>> =
                    vec![Vec::with_capacity(accs.len()); fields];
                for acc in accs.iter_mut() {
                    for (column, value) in columns.iter_mut().zip(acc.state()?) {
                        column.push(value);
                    }
                }
                columns
                    .into_iter()
                    .map(|c| Ok(ScalarValue::iter_to_array(c)?))
                    .collect::<Result<Vec<_>>>()
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(FrozenPane { keys, states })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{Step, assert_restores, batch, drain, input_schema, spec};
    use super::*;

    fn operator(kind: WindowKind, allowed_lateness: i64) -> WindowAggregate {
        WindowAggregate::try_new(spec(kind, allowed_lateness), &input_schema()).expect("operator")
    }

    /// Records over several windows, late ones included, and the watermarks that close them.
    fn script() -> Vec<Step> {
        vec![
            Step::Batch(batch(&[(1, 1.0, 100), (2, 2.0, 200), (1, 3.0, 1100)])),
            Step::Watermark(1000),
            Step::Batch(batch(&[(1, 10.0, 500), (1, 20.0, 1500), (3, 5.0, 2500)])),
            Step::Watermark(2000),
            Step::Batch(batch(&[(2, 1.0, 2600), (1, 2.0, 4100)])),
            Step::Watermark(3500),
            Step::Batch(batch(&[(3, 7.0, 4200)])),
        ]
    }

    /// TUMBLE, TUMBLE with allowed lateness, HOP: each with its lateness.
    fn kinds() -> [(WindowKind, i64); 3] {
        [
            (WindowKind::Tumble { size: 1000 }, 0),
            (WindowKind::Tumble { size: 1000 }, 500),
            (
                WindowKind::Hop {
                    size: 3000,
                    slide: 1000,
                },
                0,
            ),
        ]
    }

    #[test]
    fn tumbling_and_hopping_windows_resume_from_a_snapshot_as_if_never_interrupted() {
        for (kind, lateness) in kinds() {
            assert_restores(|| Box::new(operator(kind, lateness)), &script());
        }
    }

    /// A record whose window cannot be bounded in an i64 of ms is dropped, not a panic.
    /// Runs `script()` split over two partial phases (alternate batches, each flushed at a
    /// barrier before every watermark and, with `flush_each`, after every batch) into one
    /// final phase, which gets each watermark after the partial rows before it.
    fn two_phases(kind: WindowKind, lateness: i64, flush_each: bool) -> (String, Vec<i64>) {
        let spec = spec(kind, lateness);
        let input = input_schema();
        let partial = || WindowAggregate::with_phase(spec.clone(), &input, Phase::Partial);
        let mut partials = [partial().expect("partial"), partial().expect("partial")];
        let mut last =
            WindowAggregate::with_phase(spec.clone(), &input, Phase::Final).expect("final");
        let mut out = Vec::new();
        let mut shuffled = Vec::new();
        let flush = |partials: &mut [WindowAggregate; 2], shuffled: &mut Vec<Message>| {
            for p in partials.iter_mut() {
                assert!(
                    p.snapshot().expect("snapshot").is_none(),
                    "a partial phase keeps nothing"
                );
                p.on_barrier(CheckpointBarrier::new(1), shuffled)
                    .expect("barrier");
            }
        };
        let deliver =
            |last: &mut WindowAggregate, shuffled: &mut Vec<Message>, out: &mut Vec<Message>| {
                for m in shuffled.drain(..) {
                    if let Message::Data(b) = m {
                        last.process_batch(b, out).expect("merge");
                    }
                }
            };
        for (i, step) in script().into_iter().enumerate() {
            match step {
                Step::Batch(b) => {
                    partials[i % 2]
                        .process_batch(b, &mut shuffled)
                        .expect("batch");
                    if flush_each {
                        flush(&mut partials, &mut shuffled);
                    }
                }
                Step::Watermark(w) => {
                    for p in partials.iter_mut() {
                        p.on_watermark(Watermark(w), &mut shuffled)
                            .expect("watermark");
                    }
                    flush(&mut partials, &mut shuffled);
                    deliver(&mut last, &mut shuffled, &mut out);
                    last.on_watermark(Watermark(w), &mut out)
                        .expect("watermark");
                }
            }
        }
        for p in partials.iter_mut() {
            p.on_end(&mut shuffled).expect("end");
        }
        deliver(&mut last, &mut shuffled, &mut out);
        last.on_end(&mut out).expect("end");
        drain(&mut out)
    }

    #[test]
    fn a_partial_and_a_final_phase_emit_what_one_operator_does() {
        for (kind, lateness) in kinds() {
            let mut whole = operator(kind, lateness);
            let mut expected = Vec::new();
            for step in script() {
                match step {
                    Step::Batch(b) => whole.process_batch(b, &mut expected).expect("batch"),
                    Step::Watermark(w) => whole
                        .on_watermark(Watermark(w), &mut expected)
                        .expect("watermark"),
                }
            }
            whole.on_end(&mut expected).expect("end");
            let expected = drain(&mut expected);
            assert!(!expected.0.is_empty());
            for flush_each in [false, true] {
                assert_eq!(
                    two_phases(kind, lateness, flush_each),
                    expected,
                    "{kind:?} flush_each={flush_each}"
                );
            }
        }
    }

    #[test]
    fn partial_rows_of_a_closed_window_are_late_in_the_final_phase() {
        let spec = spec(WindowKind::Tumble { size: 1000 }, 0);
        let input = input_schema();
        let mut partial =
            WindowAggregate::with_phase(spec.clone(), &input, Phase::Partial).expect("partial");
        let mut last = WindowAggregate::with_phase(spec, &input, Phase::Final).expect("final");
        let mut shuffled = Vec::new();
        partial
            .process_batch(batch(&[(1, 1.0, 100), (2, 2.0, 1500)]), &mut shuffled)
            .expect("batch");
        partial.on_end(&mut shuffled).expect("end");
        let mut out = Vec::new();
        last.on_watermark(Watermark(1000), &mut out)
            .expect("watermark");
        for m in shuffled {
            if let Message::Data(b) = m {
                last.process_batch(b, &mut out).expect("merge");
            }
        }
        last.on_end(&mut out).expect("end");
        assert_eq!(last.late_dropped(), 1, "the pane [0, 1000) had closed");
        let (rows, _) = drain(&mut out);
        assert_eq!(
            rows.lines()
                .filter(|l| l.starts_with("| 19"))
                .collect::<Vec<_>>(),
            ["| 1970-01-01T00:00:01 | 1970-01-01T00:00:02 | 2 | 1 | 2.0   |"],
            "only the open window's row is emitted"
        );
    }

    #[test]
    fn records_at_the_ends_of_the_timestamp_range_are_dropped() {
        for kind in [
            WindowKind::Tumble { size: 1000 },
            WindowKind::Hop {
                size: 3000,
                slide: 1000,
            },
        ] {
            let mut op = operator(kind, 0);
            let mut out = Vec::new();
            op.process_batch(
                batch(&[(1, 1.0, i64::MAX), (2, 2.0, i64::MIN), (3, 3.0, 100)]),
                &mut out,
            )
            .expect("batch");
            op.on_watermark(Watermark(i64::MAX), &mut out)
                .expect("watermark");
            let (rows, _) = drain(&mut out);
            let windows: Vec<&str> = rows
                .lines()
                .filter(|l| l.starts_with("| ") && !l.contains("window_start"))
                .collect();
            assert!(
                !windows.is_empty() && windows.iter().all(|w| w.contains("| 3 | 1 | 3.0")),
                "{kind:?}: only the ordinary record is in a window: {rows}"
            );
            assert_eq!(op.late_dropped(), 2, "{kind:?}");
        }
    }

    #[test]
    fn tumbling_windows_close_when_the_watermark_passes_their_end_and_late_records_are_dropped() {
        let mut op = operator(WindowKind::Tumble { size: 1000 }, 0);
        let mut out = Vec::new();
        op.process_batch(
            batch(&[(1, 1.0, 100), (2, 2.0, 200), (1, 3.0, 1100), (1, 4.0, 900)]),
            &mut out,
        )
        .expect("batch");
        assert!(out.is_empty(), "nothing is emitted before the watermark");
        op.on_watermark(Watermark(999), &mut out)
            .expect("watermark");
        let (rows, marks) = drain(&mut out);
        assert_eq!(rows, "", "window [0, 1000) is still open at 999");
        assert_eq!(
            marks,
            vec![-1],
            "the watermark passed on is held back by the size"
        );
        op.on_watermark(Watermark(1000), &mut out)
            .expect("watermark");
        let (rows, _) = drain(&mut out);
        assert_eq!(
            rows,
            "\
+---------------------+---------------------+---+---+-------+
| window_start        | window_end          | k | n | total |
+---------------------+---------------------+---+---+-------+
| 1970-01-01T00:00:00 | 1970-01-01T00:00:01 | 1 | 2 | 5.0   |
| 1970-01-01T00:00:00 | 1970-01-01T00:00:01 | 2 | 1 | 2.0   |
+---------------------+---------------------+---+---+-------+"
        );
        // 500 belongs to the closed window: dropped and counted; 1500 is on time.
        op.process_batch(batch(&[(1, 10.0, 500), (1, 20.0, 1500)]), &mut out)
            .expect("batch");
        assert_eq!(op.late_dropped(), 1);
        let report = op.state_report().expect("a window reports its state");
        assert_eq!(
            (
                report.open_windows,
                report.keys,
                report.late_dropped,
                report.emit_lag_ms
            ),
            (1, 1, 1, Some(0)),
            "window [1000, 2000) with key 1 is open; [0, 1000) was emitted at watermark 1000"
        );
        assert!(report.bytes > 0);
        op.on_end(&mut out).expect("end");
        let (rows, _) = drain(&mut out);
        assert!(
            rows.contains("| 1970-01-01T00:00:01 | 1970-01-01T00:00:02 | 1 | 2 | 23.0  |"),
            "{rows}"
        );
        assert!(!rows.contains("10.0"), "{rows}");
        assert_eq!(op.groups_in_state(), 0, "emitted windows are freed");
    }

    #[test]
    fn hopping_windows_merge_panes_and_free_them_after_their_last_window() {
        // 3 s windows every 1 s: each record is in three windows.
        let mut op = operator(
            WindowKind::Hop {
                size: 3000,
                slide: 1000,
            },
            0,
        );
        let mut out = Vec::new();
        op.process_batch(
            batch(&[
                (1, 1.0, 500),
                (1, 2.0, 1500),
                (1, 4.0, 2500),
                (1, 8.0, 3500),
            ]),
            &mut out,
        )
        .expect("batch");
        assert_eq!(
            op.groups_in_state(),
            4,
            "one group per pane: one update per record"
        );
        op.on_watermark(Watermark(3000), &mut out)
            .expect("watermark");
        let (rows, marks) = drain(&mut out);
        let windows: Vec<&str> = rows.lines().filter(|l| l.starts_with("| 19")).collect();
        assert_eq!(
            windows,
            vec![
                "| 1969-12-31T23:59:58 | 1970-01-01T00:00:01 | 1 | 1 | 1.0   |",
                "| 1969-12-31T23:59:59 | 1970-01-01T00:00:02 | 1 | 2 | 3.0   |",
                "| 1970-01-01T00:00:00 | 1970-01-01T00:00:03 | 1 | 3 | 7.0   |",
            ]
        );
        assert_eq!(marks, vec![0]);
        // Pane [0, 1000) is in no window still open; panes 1, 2 (frozen) and 3 (open) are.
        assert_eq!(op.groups_in_state(), 3);
        op.on_end(&mut out).expect("end");
        let (rows, _) = drain(&mut out);
        let windows: Vec<&str> = rows.lines().filter(|l| l.starts_with("| 19")).collect();
        assert_eq!(
            windows,
            vec![
                "| 1970-01-01T00:00:01 | 1970-01-01T00:00:04 | 1 | 3 | 14.0  |",
                "| 1970-01-01T00:00:02 | 1970-01-01T00:00:05 | 1 | 2 | 12.0  |",
                "| 1970-01-01T00:00:03 | 1970-01-01T00:00:06 | 1 | 1 | 8.0   |",
            ]
        );
        assert_eq!(op.groups_in_state(), 0);
    }

    #[test]
    fn allowed_lateness_keeps_a_window_open_past_its_end() {
        let mut op = operator(WindowKind::Tumble { size: 1000 }, 500);
        let mut out = Vec::new();
        op.process_batch(batch(&[(1, 1.0, 100)]), &mut out)
            .expect("batch");
        op.on_watermark(Watermark(1200), &mut out)
            .expect("watermark");
        op.process_batch(batch(&[(1, 2.0, 900)]), &mut out)
            .expect("batch");
        assert_eq!(op.late_dropped(), 0, "within the allowed lateness");
        op.on_watermark(Watermark(1500), &mut out)
            .expect("watermark");
        let (rows, marks) = drain(&mut out);
        assert!(rows.contains("| 1 | 2 | 3.0   |"), "{rows}");
        assert_eq!(marks, vec![-300, 0]);
        op.process_batch(batch(&[(1, 5.0, 999)]), &mut out)
            .expect("batch");
        assert_eq!(op.late_dropped(), 1);
    }
}
