//! Windowed aggregates over a feature's history (`storage/READS.md`, "`aggregate_at`").
//!
//! Which versions an aggregate sees is decided in [`crate::asof`] ([`crate::asof::in_agg_window`]
//! and [`crate::asof::window_winners`]), next to `value_at`. This module folds those values:
//! one [`Accumulator`] per aggregate, fed the window's values in event-time order.
//!
//! Every accumulator can be [merged](Accumulator::merge) with another over a disjoint set of
//! event times, and the answer of a merge is *identical* (bit for bit) to the answer over all
//! the values at once, whatever the grouping. That is what lets partial aggregates (tiles of an
//! hour or a day) stand in for the raw values: rebuilding them from the history must give the
//! same answers. Hence the rules below:
//!
//! - `count`: values in the window (tombstoned event times excluded).
//! - `sum`: int64 values are summed exactly (`i128`); a result outside int64 is
//!   [`AggValue::Overflow`]. float32/float64 values are summed exactly (a 2,176-bit fixed-point
//!   integer) and rounded once to float64 ([`ExactSum`]), so the order of addition does not
//!   matter; a NaN, or both
//!   infinities, make the sum NaN; one infinity makes it that infinity; an exact sum beyond
//!   float64's range is an infinity. An empty window sums to 0 (of the source's kind).
//! - `mean`: the exact sum (as above) divided by the count, as float64, rounded from the exact
//!   int64 sum or the float sum; absent for an empty window.
//! - `min`, `max`: by the IEEE total order (`-0.0 < +0.0`), except that a NaN in the window makes
//!   the answer NaN; absent for an empty window. int64 stays int64; floats answer float64.
//! - `last_n(n)`: the values of the newest `n` event times, oldest first (int64, float32 and
//!   string sources: [`Agg::answer_type`] has no exact list type for the others).
//! - `count_distinct`: a HyperLogLog estimate ([`Hll`], 2^12 registers: standard error
//!   1.04 / 64 = 1.6%) over the values' canonical encodings, with linear counting while the
//!   count is small (within one of the exact count at a few hundred values, but an estimate).

use crate::types::{CellVersion, EventTime, SystemTime, Value, ValueType, VersionVector};

/// An aggregate function (README "Windowed aggregations").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Agg {
    /// Values in the window.
    Count,
    /// Their sum (numeric sources).
    Sum,
    /// Their mean (numeric sources).
    Mean,
    /// The smallest (numeric sources).
    Min,
    /// The largest (numeric sources).
    Max,
    /// The values of the newest `n` event times, oldest first (int64, float32, string sources).
    LastN(u32),
    /// About how many distinct values (any source; see [`Hll`]).
    CountDistinct,
}

/// The most values `last_n` may keep.
pub const LAST_N_MAX: u32 = 1_000;

/// An aggregate's answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum AggValue {
    /// No answer: `mean`, `min` or `max` of an empty window.
    #[default]
    Absent,
    /// A count (`count`, `count_distinct`).
    Count(u64),
    /// An int64 `sum`, `min` or `max`.
    Int(i64),
    /// A float `sum`, `mean`, `min` or `max`.
    Float(f64),
    /// `last_n`'s values.
    List(Vec<Value>),
    /// An int64 sum outside int64's range.
    Overflow,
}

impl Agg {
    /// The type of this aggregate's answers over a source of type `source`: `count` and
    /// `count_distinct` answer int64; `sum`, `min` and `max` int64 over int64 and float64 over
    /// floats; `mean` float64; `last_n` the list type of its source (int64_list, string_list,
    /// or float32_vector over float32). Other sources of `last_n` have no list type to hold
    /// them exactly, and numeric aggregates need numeric sources: both are refused.
    pub fn answer_type(self, source: ValueType) -> Result<ValueType, AggError> {
        Accumulator::new(self, source)?;
        Ok(match self {
            Agg::Count | Agg::CountDistinct => ValueType::Int64,
            Agg::Mean => ValueType::Float64,
            Agg::Sum | Agg::Min | Agg::Max if source == ValueType::Int64 => ValueType::Int64,
            Agg::Sum | Agg::Min | Agg::Max => ValueType::Float64,
            Agg::LastN(_) => match source {
                ValueType::Int64 => ValueType::Int64List,
                ValueType::String => ValueType::StringList,
                ValueType::Float32 => ValueType::Float32Vector,
                found => return Err(AggError::NoListType { found }),
            },
        })
    }
}

impl AggValue {
    /// The answer as a value of `t`, the aggregate's [`Agg::answer_type`] (`None`: absent,
    /// an overflow, or an answer `t` does not hold).
    pub fn into_value(self, t: ValueType) -> Option<Value> {
        Some(match (self, t) {
            (AggValue::Count(n), ValueType::Int64) => Value::Int64(i64::try_from(n).unwrap_or(i64::MAX)),
            (AggValue::Int(i), ValueType::Int64) => Value::Int64(i),
            (AggValue::Float(x), ValueType::Float64) => Value::Float64(x),
            (AggValue::List(values), ValueType::StringList) => Value::StringList(
                values.into_iter().filter_map(|v| if let Value::String(s) = v { Some(s) } else { None }).collect(),
            ),
            (AggValue::List(values), ValueType::Float32Vector) => Value::Float32Vector(
                values.into_iter().filter_map(|v| if let Value::Float32(x) = v { Some(x) } else { None }).collect(),
            ),
            (AggValue::List(values), ValueType::Int64List) => Value::Int64List(
                values.into_iter().filter_map(|v| if let Value::Int64(i) = v { Some(i) } else { None }).collect(),
            ),
            _ => return None,
        })
    }
}

/// Why an aggregate cannot take a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AggError {
    /// A numeric aggregate over a source that is not int64, float32 or float64.
    #[error("{agg:?} takes int64, float32 or float64 values, not {found:?}")]
    NotNumeric {
        /// The aggregate.
        agg: Agg,
        /// The source's type.
        found: ValueType,
    },
    /// `last_n` over a source whose values no list type holds exactly.
    #[error("last_n takes int64, float32 or string values (answered as int64_list, float32_vector or string_list), not {found:?}")]
    NoListType {
        /// The source's type.
        found: ValueType,
    },
    /// A value of another type than the source's (a source has one type).
    #[error("{agg:?} over a {source_type:?} source met a {found:?} value")]
    WrongType {
        /// The aggregate.
        agg: Agg,
        /// The source's type.
        source_type: ValueType,
        /// The value's.
        found: ValueType,
    },
}

impl From<AggError> for crate::Error {
    fn from(e: AggError) -> Self {
        crate::Error::InvalidArgument(e.to_string())
    }
}

/// The number inside a numeric value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Number {
    Int(i64),
    Float(f64),
}

fn number(v: &Value) -> Option<Number> {
    match v {
        Value::Int64(i) => Some(Number::Int(*i)),
        Value::Float32(x) => Some(Number::Float(f64::from(*x))),
        Value::Float64(x) => Some(Number::Float(*x)),
        _ => None,
    }
}

fn less(a: Number, b: Number) -> bool {
    match (a, b) {
        (Number::Int(a), Number::Int(b)) => a < b,
        (Number::Float(a), Number::Float(b)) => a.total_cmp(&b).is_lt(),
        // One source has one type (checked as values are added).
        _ => false,
    }
}

/// The state of one aggregate over some of a window's event times (mergeable; see the module
/// docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Accumulator {
    agg: Agg,
    source: ValueType,
    count: u64,
    int_sum: i128,
    float_sum: ExactSum,
    nan: bool,
    /// The smallest and largest number so far (total order).
    min: Option<Number>,
    max: Option<Number>,
    /// `last_n`: the newest values, oldest first, with their event times.
    last: std::collections::VecDeque<(i64, Value)>,
    hll: Option<Box<Hll>>,
}

impl Accumulator {
    /// An empty accumulator of `agg` over a source of type `source`; a numeric aggregate
    /// over another type is refused.
    pub fn new(agg: Agg, source: ValueType) -> Result<Accumulator, AggError> {
        let numeric_agg = matches!(agg, Agg::Sum | Agg::Mean | Agg::Min | Agg::Max);
        let numeric_source = matches!(source, ValueType::Int64 | ValueType::Float32 | ValueType::Float64);
        if numeric_agg && !numeric_source {
            return Err(AggError::NotNumeric { agg, found: source });
        }
        let floats = numeric_agg && matches!(source, ValueType::Float32 | ValueType::Float64);
        Ok(Accumulator {
            agg,
            source,
            count: 0,
            int_sum: 0,
            // Only a numeric aggregate of floats reads it: the others keep no limbs (tiles
            // hold many accumulators).
            float_sum: if floats { ExactSum::default() } else { ExactSum::unused() },
            nan: false,
            min: None,
            max: None,
            last: std::collections::VecDeque::new(),
            hll: matches!(agg, Agg::CountDistinct).then(|| Box::new(Hll::new())),
        })
    }

    /// The aggregate.
    pub fn agg(&self) -> Agg {
        self.agg
    }

    /// The source's type.
    pub fn source(&self) -> ValueType {
        self.source
    }

    /// Bytes this accumulator holds on the heap (for cache budgets).
    pub fn heap_bytes(&self) -> usize {
        self.float_sum.limbs.capacity() * 8
            + self.last.capacity() * std::mem::size_of::<(i64, Value)>()
            + self.last.iter().map(|(_, v)| v.heap_bytes()).sum::<usize>()
            + self.hll.as_ref().map_or(0, |h| std::mem::size_of::<Hll>() + h.heap_bytes())
            + std::mem::size_of::<Self>()
    }

    /// Adds the winning value at `event_time` (each event time once; in ascending order, or
    /// through [`Accumulator::merge`]).
    pub fn add(&mut self, event_time: i64, v: &Value) -> Result<(), AggError> {
        if v.value_type() != self.source {
            return Err(AggError::WrongType { agg: self.agg, source_type: self.source, found: v.value_type() });
        }
        self.count += 1;
        match self.agg {
            Agg::Count => {}
            Agg::Sum | Agg::Mean | Agg::Min | Agg::Max => {
                if let Some(n) = number(v) {
                    match n {
                        Number::Int(i) => self.int_sum += i128::from(i),
                        Number::Float(x) => {
                            self.nan |= x.is_nan();
                            self.float_sum.add(x);
                        }
                    }
                    self.extremes(n);
                }
            }
            Agg::LastN(n) => {
                self.last.push_back((event_time, v.clone()));
                while self.last.len() > n.min(LAST_N_MAX) as usize {
                    self.last.pop_front();
                }
            }
            Agg::CountDistinct => {
                if let Some(h) = &mut self.hll {
                    h.add(v);
                }
            }
        }
        Ok(())
    }

    fn extremes(&mut self, n: Number) {
        if self.min.is_none_or(|m| less(n, m)) {
            self.min = Some(n);
        }
        if self.max.is_none_or(|m| less(m, n)) {
            self.max = Some(n);
        }
    }

    /// Folds in another accumulator of the same aggregate and source over other event times.
    /// Only the state its aggregate reads is merged (tiles merge many per read).
    pub fn merge(&mut self, other: &Accumulator) {
        debug_assert_eq!((self.agg, self.source), (other.agg, other.source));
        self.count += other.count;
        match self.agg {
            Agg::Count => {}
            Agg::Sum | Agg::Mean | Agg::Min | Agg::Max => {
                if self.source == ValueType::Int64 {
                    self.int_sum += other.int_sum;
                } else {
                    self.float_sum.merge(&other.float_sum);
                    self.nan |= other.nan;
                }
                // The other side's extremes are among its numbers: folding them in is exact.
                for n in other.min.into_iter().chain(other.max) {
                    self.extremes(n);
                }
            }
            Agg::LastN(n) => {
                let keep = n.min(LAST_N_MAX) as usize;
                let (mine, theirs) = (self.last.back().map(|v| v.0), other.last.front().map(|v| v.0));
                let full_and_newer =
                    self.last.len() >= keep && other.last.back().map(|v| v.0) < self.last.front().map(|v| v.0);
                match (mine, theirs) {
                    (_, None) => {}
                    // Nothing of the other side would be kept.
                    _ if full_and_newer => {}
                    // The usual cases of disjoint ranges: append, or put in front.
                    (None, Some(_)) => self.last.extend(other.last.iter().cloned()),
                    (Some(a), Some(b)) if a < b => self.last.extend(other.last.iter().cloned()),
                    _ if other.last.back().map(|v| v.0) < self.last.front().map(|v| v.0) => {
                        for v in other.last.iter().rev() {
                            self.last.push_front(v.clone());
                        }
                    }
                    _ => {
                        let mut all: Vec<(i64, Value)> =
                            self.last.drain(..).chain(other.last.iter().cloned()).collect();
                        all.sort_by_key(|(t, _)| *t);
                        self.last = all.into();
                    }
                }
                while self.last.len() > keep {
                    self.last.pop_front();
                }
            }
            Agg::CountDistinct => {
                if let (Some(a), Some(b)) = (&mut self.hll, &other.hll) {
                    a.merge(b);
                }
            }
        }
    }

    /// The answer.
    pub fn value(&self) -> AggValue {
        let empty = self.count == 0;
        let ints = self.source == ValueType::Int64;
        match self.agg {
            Agg::Count | Agg::Sum | Agg::Mean => {
                count_sum_mean(self.agg, ints, self.count, self.int_sum, || self.float_sum.value())
            }
            Agg::CountDistinct => AggValue::Count(self.hll.as_ref().map_or(0, |h| h.estimate())),
            Agg::LastN(_) => AggValue::List(self.last.iter().map(|(_, v)| v.clone()).collect()),
            Agg::Min | Agg::Max if empty => AggValue::Absent,
            Agg::Min | Agg::Max if self.nan => AggValue::Float(f64::NAN),
            Agg::Min | Agg::Max => match if self.agg == Agg::Min { self.min } else { self.max } {
                Some(Number::Int(i)) => AggValue::Int(i),
                Some(Number::Float(x)) => AggValue::Float(x),
                None => AggValue::Absent,
            },
        }
    }
}

/// The answer of `count`, `sum` or `mean` (`Absent` for another function) from the count,
/// the exact int64 sum and the float sum (read only for a float source), as
/// [`Accumulator::value`] and the join's sliding window give it.
fn count_sum_mean(agg: Agg, ints: bool, count: u64, int_sum: i128, float_sum: impl FnOnce() -> f64) -> AggValue {
    match agg {
        Agg::Count => AggValue::Count(count),
        Agg::Sum if ints => i64::try_from(int_sum).map_or(AggValue::Overflow, AggValue::Int),
        Agg::Sum => AggValue::Float(float_sum()),
        Agg::Mean if count == 0 => AggValue::Absent,
        Agg::Mean => {
            let sum = if ints { int_sum as f64 } else { float_sum() };
            AggValue::Float(sum / count as f64)
        }
        _ => AggValue::Absent,
    }
}

/// Folds an aggregate window's winners, listed newest first (as [`crate::asof::window_winners`]
/// and [`crate::asof::all_winners`] give them), into `acc` oldest first; a tombstone winner
/// (no value) removes its event time. Returns the newest event time with a value.
pub fn fold_winners<V, E: From<AggError>>(
    winners: &[&V],
    times: impl Fn(&V) -> (EventTime, SystemTime),
    value: impl Fn(&V) -> Result<Option<Value>, E>,
    acc: &mut Accumulator,
) -> Result<Option<EventTime>, E> {
    let mut newest = None;
    for v in winners.iter().rev() {
        if let Some(x) = value(v)? {
            let e = times(v).0;
            acc.add(e.0, &x)?;
            newest = Some(e);
        }
    }
    Ok(newest)
}

/// Which window an aggregate reads: `as_of - width < event_time <= as_of`, versions known at
/// `known_at` ([`crate::asof::in_agg_window`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggWindow {
    /// The window's end (inclusive).
    pub as_of: EventTime,
    /// Its width in microseconds (at least 1).
    pub width_us: u64,
    /// The latest system time considered ([`SystemTime::MAX`]: everything).
    pub known_at: SystemTime,
}

impl AggWindow {
    /// The oldest event time in the window (`as_of - width + 1`, saturating).
    pub fn event_time_min(&self) -> EventTime {
        let min = i128::from(self.as_of.0) - i128::from(self.width_us) + 1;
        EventTime(min.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
    }
}

/// `aggregate_at` (`storage/READS.md`) over one pair's versions listed in key order: the
/// brute-force answer, which pre-aggregated tiles must equal.
pub fn aggregate_sorted(
    versions: &[CellVersion],
    agg: Agg,
    source: ValueType,
    w: AggWindow,
) -> Result<AggValue, AggError> {
    let times = |v: &CellVersion| (v.event_time, v.system_time);
    let answer = aggregate_run(versions, times, |v| Ok::<_, AggError>(v.value.clone()), agg, source, w)?;
    Ok(answer.value)
}

/// An aggregate's answer with the newest event time that contributed to it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AggAnswer {
    /// The answer.
    pub value: AggValue,
    /// The newest event time in the window with a value (`None`: the window is empty).
    pub newest: Option<EventTime>,
}

/// [`aggregate_sorted`] over one pair's versions of any representation, in key order:
/// `times` gives a version's event and system time, `value` its value (`None`: a tombstone).
/// The join and the online path use it over the versions they gathered.
pub fn aggregate_run<V, E: From<AggError>>(
    versions: &[V],
    times: impl Fn(&V) -> (EventTime, SystemTime) + Copy,
    value: impl Fn(&V) -> Result<Option<Value>, E>,
    agg: Agg,
    source: ValueType,
    w: AggWindow,
) -> Result<AggAnswer, E> {
    let mut acc = Accumulator::new(agg, source)?;
    let winners: Vec<&V> = crate::asof::window_winners(versions, times, w.as_of, w.width_us, w.known_at).collect();
    let newest = fold_winners(&winners, times, value, &mut acc)?;
    Ok(AggAnswer { value: acc.value(), newest })
}

/// [`aggregate_run`] at many times over one pair's versions (key order), all read at
/// `known_at`: the answers in the order of `at`. Each event time's winner is found and its
/// value decoded once; `count`, `sum` and `mean` then slide one window along the times in
/// ascending order (each value enters and leaves it once: O(versions + times)), and the other
/// functions fold each time's window from the decoded winners (O(window) per time, `last_n`
/// only its last `n`). Answers equal [`aggregate_run`]'s at each time.
#[allow(clippy::too_many_arguments)]
pub fn aggregate_many<V, E: From<AggError>>(
    versions: &[V],
    times: impl Fn(&V) -> (EventTime, SystemTime) + Copy,
    value: impl Fn(&V) -> Result<Option<Value>, E>,
    agg: Agg,
    source: ValueType,
    width_us: u64,
    known_at: SystemTime,
    at: &[EventTime],
) -> Result<Vec<AggAnswer>, E> {
    Accumulator::new(agg, source)?;
    // Only the event times some window holds: (earliest time - width, latest time].
    let (Some(&first), Some(&last)) = (at.iter().min(), at.iter().max()) else { return Ok(Vec::new()) };
    let lo = i128::from(first.0) - i128::from(width_us);
    let from = versions.partition_point(|v| times(v).0 > last);
    let to = from + versions[from..].partition_point(|v| i128::from(times(v).0 .0) > lo);
    // Every such event time's winner known at `known_at`, oldest first; tombstones left out.
    let mut winners: Vec<(EventTime, Value)> = Vec::new();
    let all = crate::asof::all_winners(&versions[from..to], times, known_at);
    for v in all.collect::<Vec<_>>().into_iter().rev() {
        if let Some(x) = value(v)? {
            if x.value_type() != source {
                return Err(AggError::WrongType { agg, source_type: source, found: x.value_type() }.into());
            }
            winners.push((times(v).0, x));
        }
    }
    let mut order: Vec<usize> = (0..at.len()).collect();
    order.sort_by_key(|&i| at[i]);
    let mut out = vec![AggAnswer::default(); at.len()];
    // The window of time t is winners[start..end]: start - width < e, e <= t.
    let bounds = |t: EventTime, from: (usize, usize)| {
        let lo = i128::from(t.0) - i128::from(width_us);
        let end = from.1 + winners[from.1..].partition_point(|(e, _)| e.0 <= t.0);
        let start = from.0 + winners[from.0..end.max(from.0)].partition_point(|(e, _)| i128::from(e.0) <= lo);
        (start, end)
    };
    let newest = |(start, end): (usize, usize)| (end > start).then(|| winners[end - 1].0);
    if matches!(agg, Agg::Count | Agg::Sum | Agg::Mean) {
        let mut w = Sliding::new(agg, source);
        let (mut start, mut end) = (0, 0);
        for &i in &order {
            let (s, e) = bounds(at[i], (start, end));
            for (_, x) in &winners[end..e] {
                w.enter(x);
            }
            for (_, x) in &winners[start..s] {
                w.leave(x);
            }
            (start, end) = (s, e);
            out[i] = AggAnswer { value: w.value(), newest: newest((s, e)) };
        }
    } else {
        let mut from = (0, 0);
        for &i in &order {
            let (s, e) = bounds(at[i], from);
            from = (s, e);
            let skip = match agg {
                Agg::LastN(n) => e.saturating_sub(n.min(LAST_N_MAX) as usize).max(s),
                _ => s,
            };
            let mut acc = Accumulator::new(agg, source)?;
            for (t, x) in &winners[skip..e] {
                acc.add(t.0, x)?;
            }
            out[i] = AggAnswer { value: acc.value(), newest: newest((s, e)) };
        }
    }
    Ok(out)
}

/// `count`, `sum` and `mean` over a window that slides forward: values enter at its end and
/// leave at its start. Exact: an int64 sum is an `i128`, a float sum an [`ExactSum`] of the
/// finite values (adding `-x` takes `x` out exactly), with NaN and the infinities counted
/// aside, so the answer equals [`Accumulator::value`] over the values in the window.
#[derive(Debug, Clone)]
struct Sliding {
    agg: Agg,
    ints: bool,
    count: u64,
    int_sum: i128,
    float_sum: ExactSum,
    nan: u64,
    pos_inf: u64,
    neg_inf: u64,
}

impl Sliding {
    fn new(agg: Agg, source: ValueType) -> Sliding {
        Sliding {
            agg,
            ints: source == ValueType::Int64,
            count: 0,
            int_sum: 0,
            float_sum: ExactSum::default(),
            nan: 0,
            pos_inf: 0,
            neg_inf: 0,
        }
    }

    fn step(&mut self, v: &Value, sign: i8) {
        self.count = if sign > 0 { self.count + 1 } else { self.count - 1 };
        if self.agg == Agg::Count {
            return;
        }
        match number(v) {
            Some(Number::Int(i)) => self.int_sum += i128::from(sign) * i128::from(i),
            Some(Number::Float(x)) => {
                let n = if x.is_nan() {
                    &mut self.nan
                } else if x == f64::INFINITY {
                    &mut self.pos_inf
                } else if x == f64::NEG_INFINITY {
                    &mut self.neg_inf
                } else {
                    self.float_sum.add(if sign > 0 { x } else { -x });
                    return;
                };
                *n = if sign > 0 { *n + 1 } else { *n - 1 };
            }
            None => {}
        }
    }

    fn enter(&mut self, v: &Value) {
        self.step(v, 1);
    }

    fn leave(&mut self, v: &Value) {
        self.step(v, -1);
    }

    fn value(&self) -> AggValue {
        let float = || {
            ExactSum::special(self.nan > 0, self.pos_inf > 0, self.neg_inf > 0)
                .unwrap_or_else(|| self.float_sum.value())
        };
        count_sum_mean(self.agg, self.ints, self.count, self.int_sum, float)
    }
}

/// An exact sum of float64 values, rounded once when read: the same answer whatever the order
/// of addition or grouping.
///
/// A fixed-point integer in units of 2^-1074 (the smallest subnormal) holds every finite
/// float64 exactly: 2^-1074 up to 2^1024 is 2,098 bits, and 64 bits more leave room for 2^63
/// values, as a two's-complement integer of [`SUM_LIMBS`] 64-bit limbs. Adding or merging is
/// integer addition (exact, associative, commutative); reading rounds the integer to nearest,
/// ties to even, once, and a sum beyond float64's range is an infinity. NaN and infinities are
/// counted aside.
#[derive(Debug, Clone, PartialEq)]
pub struct ExactSum {
    /// Little-endian limbs of the two's-complement sum, in units of 2^-1074.
    limbs: Vec<u64>,
    nan: bool,
    pos_inf: bool,
    neg_inf: bool,
}

/// Limbs of [`ExactSum`]: 34 x 64 = 2,176 bits.
pub const SUM_LIMBS: usize = 34;

impl Default for ExactSum {
    fn default() -> Self {
        ExactSum { limbs: vec![0; SUM_LIMBS], nan: false, pos_inf: false, neg_inf: false }
    }
}

impl ExactSum {
    /// A sum no value is ever added to (it holds no limbs; only [`Accumulator`]s that never
    /// use their float sum have one).
    fn unused() -> ExactSum {
        ExactSum { limbs: Vec::new(), nan: false, pos_inf: false, neg_inf: false }
    }

    /// The sum when it holds a NaN or an infinity: NaN for a NaN or both infinities, else the
    /// infinity (`None`: only finite values).
    fn special(nan: bool, pos_inf: bool, neg_inf: bool) -> Option<f64> {
        match (nan || (pos_inf && neg_inf), pos_inf, neg_inf) {
            (true, _, _) => Some(f64::NAN),
            (_, true, _) => Some(f64::INFINITY),
            (_, _, true) => Some(f64::NEG_INFINITY),
            _ => None,
        }
    }

    /// Adds one value.
    pub fn add(&mut self, x: f64) {
        if x.is_nan() {
            self.nan = true;
            return;
        }
        if x.is_infinite() {
            if x > 0.0 {
                self.pos_inf = true;
            } else {
                self.neg_inf = true;
            }
            return;
        }
        let bits = x.to_bits();
        let exp = (bits >> 52) & 0x7ff;
        let frac = bits & ((1 << 52) - 1);
        // x = mant * 2^shift units of 2^-1074 (a subnormal: frac * 2^-1074).
        let (mant, shift) = if exp == 0 { (frac, 0) } else { (frac | (1 << 52), exp - 1) };
        if mant == 0 {
            return;
        }
        let (idx, bit) = ((shift / 64) as usize, shift % 64);
        let lo = mant << bit;
        let hi = if bit == 0 { 0 } else { mant >> (64 - bit) };
        let op = if bits >> 63 == 1 { u64::overflowing_sub } else { u64::overflowing_add };
        self.ripple(idx, lo, hi, op);
    }

    /// Adds (`op` = `u64::overflowing_add`) or subtracts (`u64::overflowing_sub`) the two-limb
    /// number `hi:lo` at limb `idx`, rippling the carry or borrow upward.
    fn ripple(&mut self, idx: usize, lo: u64, hi: u64, op: fn(u64, u64) -> (u64, bool)) {
        let mut carry = false;
        for (i, limb) in self.limbs[idx..].iter_mut().enumerate() {
            let operand = match i {
                0 => lo,
                1 => hi,
                _ => 0,
            };
            if i > 0 && operand == 0 && !carry {
                break;
            }
            let (a, c1) = op(*limb, operand);
            let (b, c2) = op(a, u64::from(carry));
            *limb = b;
            carry = c1 || c2;
        }
    }

    /// Adds another sum's values.
    pub fn merge(&mut self, other: &ExactSum) {
        let mut carry = false;
        for (a, &b) in self.limbs.iter_mut().zip(&other.limbs) {
            let (s1, c1) = a.overflowing_add(b);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            *a = s2;
            carry = c1 || c2;
        }
        self.nan |= other.nan;
        self.pos_inf |= other.pos_inf;
        self.neg_inf |= other.neg_inf;
    }

    /// The exact sum, rounded once (to nearest, ties to even).
    pub fn value(&self) -> f64 {
        debug_assert_eq!(self.limbs.len(), SUM_LIMBS, "an unused sum is never read");
        if let Some(x) = Self::special(self.nan, self.pos_inf, self.neg_inf) {
            return x;
        }
        let negative = self.limbs[SUM_LIMBS - 1] >> 63 == 1;
        let mut m = self.limbs.clone();
        if negative {
            // The magnitude: two's complement.
            let mut carry = true;
            for l in m.iter_mut() {
                let (v, c) = (!*l).overflowing_add(u64::from(carry));
                *l = v;
                carry = c;
            }
        }
        let magnitude = round_units(&m);
        if negative {
            -magnitude
        } else {
            magnitude
        }
    }
}

/// A non-negative integer in units of 2^-1074 (little-endian limbs) rounded to float64, to
/// nearest, ties to even.
fn round_units(m: &[u64]) -> f64 {
    let Some(top) = m.iter().rposition(|&l| l != 0) else {
        return 0.0;
    };
    let h = top * 64 + 63 - m[top].leading_zeros() as usize; // the highest set bit
    if h < 53 {
        // Below 2^53 units: a subnormal or the least normal binade, whose bit pattern is the
        // integer itself.
        return f64::from_bits(m[0]);
    }
    let bit = |i: usize| (m[i / 64] >> (i % 64)) & 1;
    // The 53 bits from h down, the next one, and whether anything below it is set.
    let low = h - 52;
    let mut mant = 0u64;
    for i in (low..=h).rev() {
        mant = (mant << 1) | bit(i);
    }
    let round = bit(low - 1) == 1;
    let sticky = (0..low - 1).any(|i| bit(i) == 1);
    let mut h = h;
    if round && (sticky || mant & 1 == 1) {
        mant += 1;
        if mant == 1 << 53 {
            mant >>= 1;
            h += 1;
        }
    }
    // mant * 2^(h - 52) units = 1.f * 2^(h - 1074): biased exponent h - 1074 + 1023.
    let biased = h as u64 - 51;
    if biased >= 0x7ff {
        return f64::INFINITY;
    }
    f64::from_bits((biased << 52) | (mant & ((1 << 52) - 1)))
}

/// HyperLogLog over values' canonical encodings, 2^[`HLL_BITS`] one-byte registers.
#[derive(Debug, Clone, PartialEq)]
pub struct Hll {
    registers: Vec<u8>,
}

/// Index bits of [`Hll`]: 4,096 registers, standard error 1.04 / sqrt(4096) = 1.625%.
pub const HLL_BITS: u32 = 12;

impl Default for Hll {
    fn default() -> Self {
        Hll::new()
    }
}

impl Hll {
    /// Bytes its registers hold on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.registers.capacity()
    }

    /// An empty sketch.
    pub fn new() -> Hll {
        Hll { registers: vec![0; 1 << HLL_BITS] }
    }

    /// Adds a value (by its encoding, so `1` the int and `1.0` the float differ, and `-0.0`
    /// differs from `+0.0`).
    pub fn add(&mut self, v: &Value) {
        let mut buf = Vec::new();
        crate::cell::encode(Some(v), &VersionVector::new(), &mut buf);
        let h = crate::hash::stable_hash64(&buf);
        let index = (h >> (64 - HLL_BITS)) as usize;
        let rank = ((h << HLL_BITS) | (1 << (HLL_BITS - 1))).leading_zeros() as u8 + 1;
        if self.registers[index] < rank {
            self.registers[index] = rank;
        }
    }

    /// Folds in another sketch (register-wise maximum: exact, whatever the grouping).
    pub fn merge(&mut self, other: &Hll) {
        for (a, b) in self.registers.iter_mut().zip(&other.registers) {
            *a = (*a).max(*b);
        }
    }

    /// The estimate: HyperLogLog's, with linear counting while it is at most 2.5 registers'
    /// worth (Flajolet et al.; a 64-bit hash needs no large-range correction).
    pub fn estimate(&self) -> u64 {
        let m = self.registers.len() as f64;
        let zeros = self.registers.iter().filter(|r| **r == 0).count();
        let sum: f64 = self.registers.iter().map(|&r| 2f64.powi(-i32::from(r))).sum();
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        let e = if raw <= 2.5 * m && zeros > 0 { m * (m / zeros as f64).ln() } else { raw };
        e.round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(xs: &[f64]) -> f64 {
        let mut s = ExactSum::default();
        for &x in xs {
            s.add(x);
        }
        s.value()
    }

    #[test]
    fn float_sums_are_exact_and_rounded_once() {
        assert_eq!(sum(&[1e100, 1.0, -1e100]), 1.0);
        assert_eq!(sum(&[0.1; 10]), 1.0); // naive addition gives 0.9999999999999999
        assert_eq!(sum(&[1e308, 1e308, -1e308]), 1e308); // no intermediate overflow
        assert_eq!(sum(&[f64::MAX, f64::MAX]), f64::INFINITY);
        assert_eq!(sum(&[f64::MAX, f64::MAX, -f64::MAX]), f64::MAX);
        assert_eq!(sum(&[5e-324, 5e-324]), 1e-323); // subnormals exactly
        assert_eq!(sum(&[]), 0.0);
        assert!(sum(&[1.0, f64::NAN]).is_nan());
        assert!(sum(&[f64::INFINITY, f64::NEG_INFINITY]).is_nan());
        assert_eq!(sum(&[f64::INFINITY, 1.0]), f64::INFINITY);
        // Ties round to even across partials: 1 + 2^-53 + 2^-106 is just above the tie.
        assert_eq!(sum(&[1.0, 2f64.powi(-53), 2f64.powi(-106)]), 1.0 + f64::EPSILON);
        assert_eq!(sum(&[1.0, 2f64.powi(-53)]), 1.0);
    }

    #[test]
    fn sums_near_the_top_of_the_range_round_once() {
        let p = |e: i32| 2f64.powi(e);
        // Just below the midpoint between MAX and 2^1024: MAX, whatever the order.
        assert_eq!(sum(&[f64::MAX, p(970), -1.0]), f64::MAX);
        assert_eq!(sum(&[-1.0, p(970), f64::MAX]), f64::MAX);
        let xs = [f64::MAX, p(970), p(970) - p(917), -p(970)];
        let orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [3, 0, 2, 1], [1, 2, 3, 0]];
        for o in orders {
            assert_eq!(sum(&o.map(|i| xs[i])), f64::MAX, "{o:?}");
        }
        // Past the midpoint: infinity, not NaN.
        let mut v = vec![f64::MAX];
        v.extend(std::iter::repeat_n(p(959), 2048));
        assert_eq!(sum(&v), f64::INFINITY);
        assert_eq!(sum(&v.iter().map(|x| -x).collect::<Vec<_>>()), f64::NEG_INFINITY);
        // The midpoint itself rounds to even: to 2^1024, that is infinity.
        assert_eq!(sum(&[f64::MAX, p(970)]), f64::INFINITY);
        assert_eq!(sum(&[f64::MAX, p(970), -5e-324]), f64::MAX);
        assert_eq!(sum(&[-f64::MAX, f64::MAX, -0.0, 5e-324]), 5e-324);
        assert_eq!(sum(&[2f64.powi(-1022), -5e-324]), f64::from_bits((1 << 52) - 1));
    }

    #[test]
    fn any_grouping_gives_the_same_sum() {
        let xs = [1e300, 3.5, -1e300, 1e-300, 7e299, 0.1, 0.2, -0.3, 2e290, 1e17, -1e17, 1.0];
        let whole = sum(&xs);
        for cut in 0..xs.len() {
            let (mut a, mut b) = (ExactSum::default(), ExactSum::default());
            xs[..cut].iter().for_each(|&x| a.add(x));
            xs[cut..].iter().rev().for_each(|&x| b.add(x));
            b.merge(&a);
            assert_eq!(b.value().to_bits(), whole.to_bits(), "cut {cut}");
        }
    }

    #[test]
    fn hll_is_exact_for_few_values_and_close_for_many() {
        let mut h = Hll::new();
        for i in 0..100 {
            h.add(&Value::Int64(i % 50));
        }
        assert_eq!(h.estimate(), 50);
        let mut h = Hll::new();
        for i in 0..200_000 {
            h.add(&Value::Int64(i));
        }
        let e = h.estimate() as f64;
        assert!((e - 200_000.0).abs() / 200_000.0 < 0.05, "{e}");
    }
}
