//! Windowed aggregates (`storage/READS.md`, `aggregate_at`) against the reference model: random
//! histories of one pair with corrections, late writes (system times in any order of event
//! times), tombstones, `known_at` and windows whose edges fall on events (the ±1 µs cases),
//! folded by the engine's rule (`asof::window_winners` + `agg::Accumulator`) and computed
//! naively from `quiver_testkit::model::window_values`. Then the property tiles rely on: the
//! window cut into tiles, each folded alone and merged in any order, answers identically.

use proptest::prelude::*;
use quiver_storage::agg::{aggregate_sorted, Accumulator, Agg, AggValue, AggWindow, ExactSum};
use quiver_storage::types::{CellVersion, EventTime, SystemTime, Value, ValueType, VersionVector};
use quiver_testkit::model::{window_values, Version};

/// One pair's history: (event time, value or tombstone), stamped 1, 2, 3... in list order, so
/// a later entry is a later write (a correction when it repeats an event time).
fn history<V: Strategy>(values: V) -> impl Strategy<Value = Vec<(i64, Option<V::Value>)>>
where
    V::Value: Clone + std::fmt::Debug,
{
    prop::collection::vec((0i64..30, prop::option::weighted(0.8, values)), 0..40)
}

fn model_versions<T: Clone>(h: &[(i64, Option<T>)]) -> Vec<Version<T>> {
    h.iter()
        .enumerate()
        .map(|(i, (e, v))| Version { event_time: *e, system_time: i as u64 + 1, value: v.clone() })
        .collect()
}

/// The engine's view: cell versions in key order (event time descending, system time
/// descending).
fn engine_versions<T: Clone>(h: &[(i64, Option<T>)], value: impl Fn(T) -> Value) -> Vec<CellVersion> {
    let mut out: Vec<CellVersion> = h
        .iter()
        .enumerate()
        .map(|(i, (e, v))| CellVersion {
            event_time: EventTime(*e),
            system_time: SystemTime(i as u64 + 1),
            value: v.clone().map(&value),
            version_vector: VersionVector::single(0, i as u64 + 1),
        })
        .collect();
    out.sort_by_key(|v| std::cmp::Reverse((v.event_time, v.system_time)));
    out
}

fn window_of(as_of: i64, width: u64, k: u64) -> AggWindow {
    AggWindow { as_of: EventTime(as_of), width_us: width, known_at: known(k) }
}

fn known(k: u64) -> SystemTime {
    if k >= 45 {
        SystemTime::MAX
    } else {
        SystemTime(k)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn int64_aggregates_match_the_model(
        h in history(prop_oneof![8 => -5i64..5, 1 => Just(i64::MAX), 1 => Just(i64::MIN)]),
        as_of in -3i64..35,
        width in 1u64..40,
        k in 0u64..50,
    ) {
        let engine = engine_versions(&h, Value::Int64);
        let model = model_versions(&h);
        let window = window_values(&model, as_of, width, known(k).0);
        let nums: Vec<i64> = window.iter().map(|(_, v)| **v).collect();
        let run = |agg| aggregate_sorted(&engine, agg, ValueType::Int64, window_of(as_of, width, k)).unwrap();

        prop_assert_eq!(run(Agg::Count), AggValue::Count(nums.len() as u64));
        let exact: i128 = nums.iter().map(|&x| i128::from(x)).sum();
        let sum = i64::try_from(exact).map_or(AggValue::Overflow, AggValue::Int);
        prop_assert_eq!(run(Agg::Sum), sum);
        let mean = if nums.is_empty() { AggValue::Absent } else { AggValue::Float(exact as f64 / nums.len() as f64) };
        prop_assert_eq!(run(Agg::Mean), mean);
        prop_assert_eq!(run(Agg::Min), nums.iter().min().map_or(AggValue::Absent, |&m| AggValue::Int(m)));
        prop_assert_eq!(run(Agg::Max), nums.iter().max().map_or(AggValue::Absent, |&m| AggValue::Int(m)));
        let last: Vec<Value> = nums.iter().rev().take(3).rev().map(|&x| Value::Int64(x)).collect();
        prop_assert_eq!(run(Agg::LastN(3)), AggValue::List(last));
        let mut distinct = nums.clone();
        distinct.sort_unstable();
        distinct.dedup();
        // Linear counting over 4,096 registers: exact but for a rare collision at these sizes.
        match run(Agg::CountDistinct) {
            AggValue::Count(c) => prop_assert!(c.abs_diff(distinct.len() as u64) <= 1, "{} vs {}", c, distinct.len()),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn float_aggregates_match_the_model(
        // Multiples of 2^-10 (and NaN, -0.0): a naive sum of them is exact, so it checks the
        // exact sum's rounding directly.
        h in history(prop_oneof![10 => (-5000i32..5000).prop_map(|k| f64::from(k) / 1024.0), 1 => Just(f64::NAN), 1 => Just(-0.0)]),
        as_of in -3i64..35,
        width in 1u64..40,
        k in 0u64..50,
    ) {
        let engine = engine_versions(&h, Value::Float64);
        let model = model_versions(&h);
        let window = window_values(&model, as_of, width, known(k).0);
        let nums: Vec<f64> = window.iter().map(|(_, v)| **v).collect();
        let run = |agg| aggregate_sorted(&engine, agg, ValueType::Float64, window_of(as_of, width, k)).unwrap();
        let float = |a: AggValue| match a { AggValue::Float(x) => Some(x), AggValue::Absent => None, other => panic!("{other:?}") };
        let same = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            (None, None) => true,
            _ => false,
        };

        let nan = nums.iter().any(|x| x.is_nan());
        let naive: f64 = nums.iter().sum();
        prop_assert!(same(float(run(Agg::Sum)), Some(if nan { f64::NAN } else { naive + 0.0 })), "{:?} vs {}", run(Agg::Sum), naive);
        let mean = (!nums.is_empty()).then(|| if nan { f64::NAN } else { (naive + 0.0) / nums.len() as f64 });
        prop_assert!(same(float(run(Agg::Mean)), mean));
        let min = nums.iter().copied().min_by(f64::total_cmp).map(|m| if nan { f64::NAN } else { m });
        let max = nums.iter().copied().max_by(f64::total_cmp).map(|m| if nan { f64::NAN } else { m });
        prop_assert!(same(float(run(Agg::Min)), min), "{:?} vs {:?}", run(Agg::Min), min);
        prop_assert!(same(float(run(Agg::Max)), max));
    }

    #[test]
    fn tiles_merged_in_any_order_answer_as_the_whole_window(
        h in history(prop_oneof![6 => -1e6f64..1e6, 1 => Just(1e300), 1 => Just(-1e300), 1 => Just(0.1), 1 => Just(-0.0)]),
        as_of in 0i64..35,
        width in 1u64..40,
        tile in 1i64..10,
        reverse in any::<bool>(),
    ) {
        let model = model_versions(&h);
        let window = window_values(&model, as_of, width, u64::MAX);
        for agg in [Agg::Count, Agg::Sum, Agg::Mean, Agg::Min, Agg::Max, Agg::LastN(4), Agg::CountDistinct] {
            let mut whole = Accumulator::new(agg, ValueType::Float64).unwrap();
            for (e, v) in &window {
                whole.add(*e, &Value::Float64(**v)).unwrap();
            }
            let mut tiles: Vec<Accumulator> = Vec::new();
            let mut current: Option<(i64, Accumulator)> = None;
            for (e, v) in &window {
                let t = e.div_euclid(tile);
                if current.as_ref().is_none_or(|(ct, _)| *ct != t) {
                    tiles.extend(current.take().map(|(_, a)| a));
                    current = Some((t, Accumulator::new(agg, ValueType::Float64).unwrap()));
                }
                if let Some((_, a)) = &mut current {
                    a.add(*e, &Value::Float64(**v)).unwrap();
                }
            }
            tiles.extend(current.map(|(_, a)| a));
            if reverse {
                tiles.reverse();
            }
            let mut merged = Accumulator::new(agg, ValueType::Float64).unwrap();
            for t in &tiles {
                merged.merge(t);
            }
            let (a, b) = (merged.value(), whole.value());
            let equal = match (&a, &b) {
                (AggValue::Float(x), AggValue::Float(y)) => x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                _ => a == b,
            };
            prop_assert!(equal, "{:?}: tiles {:?}, whole {:?}", agg, a, b);
        }
    }
}

#[test]
fn numeric_aggregates_refuse_other_sources_and_values() {
    assert!(Accumulator::new(Agg::Sum, ValueType::String).is_err());
    assert!(Accumulator::new(Agg::Count, ValueType::String).is_ok());
    assert!(Accumulator::new(Agg::LastN(2), ValueType::StringList).is_ok());
    let mut a = Accumulator::new(Agg::Sum, ValueType::Int64).expect("int sum");
    assert!(a.add(1, &Value::Float64(1.0)).is_err());
    assert_eq!(a.value(), AggValue::Int(0), "an empty int64 window sums to 0");
    let a = Accumulator::new(Agg::Sum, ValueType::Float32).expect("float sum");
    assert_eq!(a.value(), AggValue::Float(0.0));
    let mut s = ExactSum::default();
    s.add(f64::MAX);
    s.add(f64::MAX);
    assert_eq!(s.value(), f64::INFINITY);
}

/// An independent exact sum for the check below: Shewchuk's partials and CPython's `fsum`
/// rounding (valid while no partial sum overflows).
fn fsum(xs: &[f64]) -> f64 {
    let mut p: Vec<f64> = Vec::new();
    for &x0 in xs {
        let mut x = x0;
        let mut i = 0;
        for j in 0..p.len() {
            let mut y = p[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                p[i] = lo;
                i += 1;
            }
            x = hi;
        }
        p.truncate(i);
        p.push(x);
    }
    let mut n = p.len();
    if n == 0 {
        return 0.0;
    }
    n -= 1;
    let (mut hi, mut lo) = (p[n], 0.0);
    while n > 0 {
        let x = hi;
        n -= 1;
        let y = p[n];
        hi = x + y;
        lo = y - (hi - x);
        if lo != 0.0 {
            break;
        }
    }
    if n > 0 && ((lo < 0.0 && p[n - 1] < 0.0) || (lo > 0.0 && p[n - 1] > 0.0)) {
        let y = lo * 2.0;
        let x = hi + y;
        if y == x - hi {
            hi = x;
        }
    }
    hi
}

fn any_float() -> impl Strategy<Value = f64> {
    // Every binade from subnormals up to 2^1000, both signs, and exact cancellations.
    (any::<bool>(), 0u64..(1 << 52), 0u64..2001).prop_map(|(neg, frac, exp)| {
        let x = f64::from_bits((exp << 52) | frac);
        if neg {
            -x
        } else {
            x
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn exact_sums_match_an_independent_exact_sum_in_any_grouping(
        mut xs in prop::collection::vec(any_float(), 0..30),
        cut in any::<prop::sample::Index>(),
        cancel in any::<bool>(),
        tie in any::<bool>(),
    ) {
        if cancel && !xs.is_empty() {
            let x = xs[0];
            xs.push(-x); // cancellation down to the small terms
        }
        if tie && !xs.is_empty() {
            // x and half its ulp: an exact tie, rounded to even.
            let x = xs[0];
            let half = (f64::from_bits(x.abs().to_bits() + 1) - x.abs()) / 2.0;
            xs = vec![x, half.copysign(x)];
        }
        let want = fsum(&xs) + 0.0;
        let mut whole = ExactSum::default();
        xs.iter().for_each(|&x| whole.add(x));
        prop_assert_eq!(whole.value().to_bits(), want.to_bits(), "{:?}", xs);
        let k = if xs.is_empty() { 0 } else { cut.index(xs.len() + 1) };
        let (mut a, mut b) = (ExactSum::default(), ExactSum::default());
        xs[..k].iter().rev().for_each(|&x| a.add(x));
        xs[k..].iter().for_each(|&x| b.add(x));
        b.merge(&a);
        prop_assert_eq!(b.value().to_bits(), want.to_bits());
    }
}

/// Every aggregate at many times, as [`aggregate_many`] answers them for a join's rows (a
/// sliding window for count, sum and mean), against [`aggregate_sorted`] at each time.
fn many_matches_one_at_a_time(engine: &[CellVersion], source: ValueType, times: &[i64], width: u64, k: u64) {
    use quiver_storage::agg::aggregate_many;
    let at: Vec<EventTime> = times.iter().map(|&t| EventTime(t)).collect();
    for agg in [Agg::Count, Agg::Sum, Agg::Mean, Agg::Min, Agg::Max, Agg::LastN(2), Agg::CountDistinct] {
        let got = aggregate_many(
            engine,
            |v| (v.event_time, v.system_time),
            |v| Ok::<_, quiver_storage::agg::AggError>(v.value.clone()),
            agg,
            source,
            width,
            known(k),
            &at,
        )
        .expect("many");
        for (i, &t) in times.iter().enumerate() {
            let w = window_of(t, width, k);
            let one = aggregate_sorted(engine, agg, source, w).expect("one");
            let same = match (&got[i].value, &one) {
                (AggValue::Float(a), AggValue::Float(b)) => a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                // Lists may hold NaN: compared as printed (NaN equal to NaN, -0.0 not to 0.0).
                (a, b) => format!("{a:?}") == format!("{b:?}"),
            };
            assert!(same, "{agg:?} at {t} over {width}: {:?} vs {one:?}", got[i].value);
            // The newest event in the window with a value.
            let newest = quiver_storage::asof::window_winners(
                engine,
                |v| (v.event_time, v.system_time),
                EventTime(t),
                width,
                known(k),
            )
            .find(|v| v.value.is_some())
            .map(|v| v.event_time);
            assert_eq!(got[i].newest, newest, "{agg:?} newest at {t}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn aggregates_at_many_times_match_one_time_at_a_time(
        ints in history(prop_oneof![8 => -5i64..5, 1 => Just(i64::MAX), 1 => Just(i64::MIN)]),
        floats in history(prop_oneof![8 => any_float(), 1 => Just(f64::NAN), 1 => Just(f64::INFINITY), 1 => Just(f64::NEG_INFINITY), 1 => Just(-0.0)]),
        times in prop::collection::vec(-3i64..35, 0..12),
        width in 1u64..40,
        k in 0u64..50,
    ) {
        many_matches_one_at_a_time(&engine_versions(&ints, Value::Int64), ValueType::Int64, &times, width, k);
        many_matches_one_at_a_time(&engine_versions(&floats, Value::Float64), ValueType::Float64, &times, width, k);
    }
}
