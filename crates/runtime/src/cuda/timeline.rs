//! The decode step's timeline from the kernels' own records (`MIMO_TRACE=1`,
//! mimo_kernels::cuda trace): one span per kernel launch, in launch order, so that the time
//! between the kernels of a PDL chain can be read off (bench JSON `timeline`).

use std::collections::{BTreeMap, BTreeSet};

use mimo_kernels::cuda::{trace_file_name, TraceRecord};
use serde::Serialize;

/// One source location of one kernel launch in a traced step: its `pdl_enter` call (the wait
/// on the kernels before it) or a `trace_mark` point after it. Times are microseconds from the
/// step's first record.
#[derive(Debug, Clone, Serialize)]
pub struct GridSpan {
    /// The launch's place in the step (spans of one launch share it), in the order their
    /// waits returned: the order of the PDL chain.
    pub launch: usize,
    /// Source location ("file:line"): which kernel body and which point of it.
    pub site: String,
    /// A `trace_mark` point after (or before) the wait, not the wait itself.
    pub mark: bool,
    /// Blocks that recorded here (each block's first record only).
    pub blocks: usize,
    /// Distinct multiprocessors those blocks ran on.
    pub sms: usize,
    /// First block's arrival (at the wait, or at the mark).
    pub first_begin_us: f64,
    /// Last block's arrival (later than the first where blocks came in waves, waited for room
    /// on a multiprocessor, or finished unevenly).
    pub last_begin_us: f64,
    /// First return from the wait (every earlier kernel had finished); equal to the arrival for
    /// a mark.
    pub first_end_us: f64,
    /// Last block's return from its wait.
    pub last_end_us: f64,
}

/// Spans of every launch and site in `records`, launches ordered by their first return from a
/// wait, sites within a launch by their first time; times from the earliest record.
pub fn grid_spans(records: &[TraceRecord]) -> Vec<GridSpan> {
    let Some(t0) = records.iter().map(|r| r.wait_begin_ns).min() else {
        return Vec::new();
    };
    let us = |t: u64| (t.saturating_sub(t0)) as f64 / 1e3;
    struct Acc {
        blocks: BTreeSet<u32>,
        sms: BTreeSet<u8>,
        begin: (u64, u64),
        end: (u64, u64),
    }
    /// A source location: (file number, line, mark).
    type Site = (u8, u16, bool);
    // grid -> site -> span
    let mut grids: BTreeMap<u64, BTreeMap<Site, Acc>> = BTreeMap::new();
    for r in records {
        let a = grids
            .entry(r.grid)
            .or_default()
            .entry((r.file, r.line, r.mark))
            .or_insert_with(|| Acc {
                blocks: BTreeSet::new(),
                sms: BTreeSet::new(),
                begin: (u64::MAX, 0),
                end: (u64::MAX, 0),
            });
        // A block's later pdl_enter calls at one site (after its first wait they return at
        // once) add nothing: each block's first record only.
        if !a.blocks.insert(r.block) {
            continue;
        }
        a.sms.insert(r.sm);
        a.begin = (
            a.begin.0.min(r.wait_begin_ns),
            a.begin.1.max(r.wait_begin_ns),
        );
        a.end = (a.end.0.min(r.wait_end_ns), a.end.1.max(r.wait_end_ns));
    }
    let mut launches: Vec<(u64, Vec<(Site, Acc)>)> = grids
        .into_values()
        .map(|sites| {
            let mut v: Vec<(Site, Acc)> = sites.into_iter().collect();
            v.sort_by_key(|(_, a)| (a.end.0, a.begin.0));
            // The launch's place: its wait's first return (a mark may come before the wait).
            let release = v
                .iter()
                .filter(|((_, _, mark), _)| !mark)
                .chain(v.iter())
                .map(|(_, a)| a.end.0)
                .next()
                .unwrap_or(u64::MAX);
            (release, v)
        })
        .collect();
    launches.sort_by_key(|(t, _)| *t);
    let mut out = Vec::new();
    for (launch, (_, sites)) in launches.into_iter().enumerate() {
        for ((file, line, mark), a) in sites {
            out.push(GridSpan {
                launch,
                site: format!("{}:{}", trace_file_name(file), line),
                mark,
                blocks: a.blocks.len(),
                sms: a.sms.len(),
                first_begin_us: us(a.begin.0),
                last_begin_us: us(a.begin.1),
                first_end_us: us(a.end.0),
                last_end_us: us(a.end.1),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(grid: u64, block: u32, begin: u64, end: u64) -> TraceRecord {
        TraceRecord {
            grid,
            wait_begin_ns: begin,
            wait_end_ns: end,
            block,
            line: 10 + grid as u16,
            mark: false,
            file: 1,
            sm: block as u8,
        }
    }

    #[test]
    fn marks_follow_their_launch() {
        let mut mark = rec(3, 0, 4_000, 4_000);
        (mark.line, mark.mark) = (99, true);
        // A mark of launch 7 before its wait, earlier than launch 3's wait return: launch 7
        // still comes second.
        let mut early = rec(7, 0, 1_200, 1_200);
        (early.line, early.mark) = (98, true);
        let records = [
            early,
            rec(7, 0, 1_500, 3_000),
            mark,
            rec(3, 0, 1_000, 2_000),
        ];
        let s = grid_spans(&records);
        let got: Vec<(usize, &str)> = s.iter().map(|g| (g.launch, g.site.as_str())).collect();
        assert_eq!(
            got,
            [
                (0, "fp4_gemm.cu:13"),
                (0, "fp4_gemm.cu:99"),
                (1, "fp4_gemm.cu:98"),
                (1, "fp4_gemm.cu:17")
            ]
        );
        assert!(s[1].mark && s[2].mark && !s[3].mark);
        assert_eq!(s[1].first_end_us, 3.0);
    }

    #[test]
    fn spans_follow_wait_order_and_ignore_repeat_calls() {
        let records = [
            rec(7, 0, 5_000, 9_000),
            rec(7, 1, 6_000, 9_500),
            // Block 1's second call, after its wait: ignored.
            rec(7, 1, 12_000, 12_000),
            rec(3, 0, 1_000, 1_000),
            rec(3, 1, 2_000, 2_500),
        ];
        let s = grid_spans(&records);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].launch, s[1].launch), (0, 1));
        assert_eq!(s[0].site, "fp4_gemm.cu:13");
        assert_eq!((s[0].blocks, s[0].sms), (2, 2));
        assert_eq!((s[0].first_begin_us, s[0].last_begin_us), (0.0, 1.0));
        assert_eq!((s[1].first_end_us, s[1].last_end_us), (8.0, 8.5));
        assert_eq!((s[1].first_begin_us, s[1].last_begin_us), (4.0, 5.0));
        assert!(grid_spans(&[]).is_empty());
    }
}
