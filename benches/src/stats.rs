//! Samples, medians and the ferrovirt-to-peer ratio of one metric.
//!
//! Machines are shared and noisy, so a metric is many samples per side, taken alternately,
//! and reported by its median; min and max show the spread.

use serde::{Deserialize, Serialize};

/// Which direction of a metric is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

/// The two things every suite compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Ferrovirt,
    Peer,
}

/// The order of the two sides in round `round`: alternating, so neither always runs first
/// (and so neither always gets the warmer cache or the quieter neighbour).
pub fn round_order(round: usize) -> [Side; 2] {
    if round.is_multiple_of(2) {
        [Side::Ferrovirt, Side::Peer]
    } else {
        [Side::Peer, Side::Ferrovirt]
    }
}

/// All samples of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    pub name: String,
    pub unit: String,
    pub better: Better,
    pub ferrovirt: Vec<f64>,
    pub peer: Vec<f64>,
}

impl Samples {
    pub fn new(name: &str, unit: &str, better: Better) -> Samples {
        Samples {
            name: name.to_string(),
            unit: unit.to_string(),
            better,
            ferrovirt: Vec::new(),
            peer: Vec::new(),
        }
    }

    pub fn push(&mut self, side: Side, value: f64) {
        match side {
            Side::Ferrovirt => self.ferrovirt.push(value),
            Side::Peer => self.peer.push(value),
        }
    }

    /// Medians, spreads and the ratio; `None` when a side has no finite sample.
    pub fn summarize(&self, peer_name: &str) -> Option<Summary> {
        let ferrovirt = Spread::of(&self.ferrovirt)?;
        let peer = Spread::of(&self.peer)?;
        Some(Summary {
            row: ResultRow {
                name: self.name.clone(),
                unit: self.unit.clone(),
                ferrovirt: ferrovirt.median,
                peer: peer.median,
                peer_name: peer_name.to_string(),
                ratio: ratio(ferrovirt.median, peer.median),
                better: self.better,
            },
            ferrovirt_spread: ferrovirt,
            peer_spread: peer,
        })
    }
}

/// Min, median and max of a sample set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub count: usize,
}

impl Spread {
    /// Ignores non-finite values; `None` if none is left.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let count = sorted.len();
        let median = median_of_sorted(&sorted)?;
        Some(Spread {
            min: sorted[0],
            median,
            max: sorted[count - 1],
            count,
        })
    }
}

/// The median of finite values (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    Spread::of(values).map(|s| s.median)
}

fn median_of_sorted(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if !n.is_multiple_of(2) => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// ferrovirt ÷ peer; `None` when the peer's value is zero or either is not finite.
pub fn ratio(ferrovirt: f64, peer: f64) -> Option<f64> {
    let r = ferrovirt / peer;
    (peer != 0.0 && r.is_finite()).then_some(r)
}

/// One line of `benches/results/<suite>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    pub name: String,
    pub unit: String,
    /// Median of ferrovirt's samples.
    pub ferrovirt: f64,
    /// Median of the peer's samples.
    pub peer: f64,
    pub peer_name: String,
    /// ferrovirt ÷ peer (null when the peer measured 0).
    pub ratio: Option<f64>,
    pub better: Better,
}

impl ResultRow {
    /// Whether ferrovirt's median is at least as good as the peer's.
    pub fn ferrovirt_wins(&self) -> bool {
        match self.better {
            Better::Higher => self.ferrovirt >= self.peer,
            Better::Lower => self.ferrovirt <= self.peer,
        }
    }
}

/// A row with the spreads behind its medians.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub row: ResultRow,
    pub ferrovirt_spread: Spread,
    pub peer_spread: Spread,
}

/// A target ferrovirt's own median must meet, whatever the peer does.
#[derive(Debug, Clone, PartialEq)]
pub struct Goal {
    pub metric: String,
    pub limit: f64,
    pub better: Better,
    /// How a person says it, e.g. "≤ 5 CPU ms to guest entry".
    pub text: String,
    /// What the limit applies to.
    pub basis: GoalBasis,
}

/// The value of a row a [`Goal`] judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoalBasis {
    /// ferrovirt's median.
    Ferrovirt,
    /// The ferrovirt ÷ peer ratio.
    Ratio,
    /// ferrovirt's median minus the peer's, for a peer that is a floor under ferrovirt's
    /// measurement (a harness's own cost).
    AbovePeer,
}

impl GoalBasis {
    /// How the report names the value.
    pub fn label(self) -> &'static str {
        match self {
            GoalBasis::Ferrovirt => "ferrovirt",
            GoalBasis::Ratio => "ratio",
            GoalBasis::AbovePeer => "ferrovirt − peer",
        }
    }
}

impl Goal {
    pub fn at_most(metric: &str, limit: f64, text: &str) -> Goal {
        Goal {
            metric: metric.to_string(),
            limit,
            better: Better::Lower,
            text: text.to_string(),
            basis: GoalBasis::Ferrovirt,
        }
    }

    /// ferrovirt's median minus the peer's (a floor) must stay at or below `limit`.
    pub fn above_peer_at_most(metric: &str, limit: f64, text: &str) -> Goal {
        Goal {
            basis: GoalBasis::AbovePeer,
            ..Goal::at_most(metric, limit, text)
        }
    }

    pub fn at_least(metric: &str, limit: f64, text: &str) -> Goal {
        Goal {
            metric: metric.to_string(),
            limit,
            better: Better::Higher,
            text: text.to_string(),
            basis: GoalBasis::Ferrovirt,
        }
    }

    /// ferrovirt must reach `limit` times the peer's median.
    pub fn ratio_at_least(metric: &str, limit: f64, text: &str) -> Goal {
        Goal {
            basis: GoalBasis::Ratio,
            ..Goal::at_least(metric, limit, text)
        }
    }

    /// ferrovirt must stay at or below `limit` times the peer's median.
    pub fn ratio_at_most(metric: &str, limit: f64, text: &str) -> Goal {
        Goal {
            basis: GoalBasis::Ratio,
            ..Goal::at_most(metric, limit, text)
        }
    }

    /// `Some(met)` with the value judged, or `None` when the metric is not in `rows`.
    pub fn check(&self, rows: &[Summary]) -> Option<(bool, f64)> {
        let row = rows.iter().find(|s| s.row.name == self.metric)?;
        let value = match self.basis {
            GoalBasis::Ferrovirt => row.row.ferrovirt,
            GoalBasis::Ratio => row.row.ratio?,
            GoalBasis::AbovePeer => row.row.ferrovirt - row.row.peer,
        };
        let met = match self.better {
            Better::Lower => value <= self.limit,
            Better::Higher => value >= self.limit,
        };
        Some((met, value))
    }
}

/// The nearest-rank percentile `p` (0..=1) of `values`.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Every metric's summary, or an error naming the first metric without samples on a side.
pub fn summarize_all(metrics: &[Samples], peer_name: &str) -> anyhow::Result<Vec<Summary>> {
    metrics
        .iter()
        .map(|s| {
            s.summarize(peer_name)
                .ok_or_else(|| anyhow::anyhow!("metric {} has no samples", s.name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn non_finite_samples_are_ignored() {
        let s = Spread::of(&[f64::NAN, 5.0, f64::INFINITY, 1.0]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.count), (1.0, 3.0, 5.0, 2));
        assert_eq!(Spread::of(&[f64::NAN]), None);
    }

    #[test]
    fn ratio_is_ferrovirt_over_peer_and_undefined_for_zero_peer() {
        assert_eq!(ratio(2.0, 8.0), Some(0.25));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(0.0, 0.0), None);
    }

    #[test]
    fn rounds_alternate_which_side_goes_first() {
        assert_eq!(round_order(0), [Side::Ferrovirt, Side::Peer]);
        assert_eq!(round_order(1), [Side::Peer, Side::Ferrovirt]);
        assert_eq!(round_order(2), round_order(0));
    }

    #[test]
    fn summary_uses_medians_and_knows_the_winner() {
        let mut s = Samples::new("cpu", "ms", Better::Lower);
        for (f, p) in [(1.0, 10.0), (9.0, 11.0), (2.0, 12.0)] {
            s.push(Side::Ferrovirt, f);
            s.push(Side::Peer, p);
        }
        let sum = s.summarize("qemu").unwrap();
        assert_eq!((sum.row.ferrovirt, sum.row.peer), (2.0, 11.0));
        assert_eq!(sum.row.ratio, Some(2.0 / 11.0));
        assert!(sum.row.ferrovirt_wins());
        assert_eq!(sum.ferrovirt_spread.max, 9.0);
        let higher = ResultRow {
            better: Better::Higher,
            ..sum.row.clone()
        };
        assert!(!higher.ferrovirt_wins());
        assert!(
            Samples::new("x", "ms", Better::Lower)
                .summarize("q")
                .is_none()
        );
    }

    #[test]
    fn goals_compare_ferrovirt_median_with_the_limit() {
        let mut s = Samples::new("rss", "MiB", Better::Lower);
        s.push(Side::Ferrovirt, 2.5);
        s.push(Side::Peer, 20.0);
        let rows = vec![s.summarize("qemu").unwrap()];
        assert_eq!(
            Goal::at_most("rss", 3.0, "≤ 3 MiB").check(&rows),
            Some((true, 2.5))
        );
        assert_eq!(
            Goal::at_least("rss", 3.0, "≥ 3").check(&rows),
            Some((false, 2.5))
        );
        assert_eq!(Goal::at_most("other", 1.0, "").check(&rows), None);
    }

    #[test]
    fn a_goal_above_a_floor_judges_the_difference_of_the_medians() {
        let mut s = Samples::new("prog", "ns", Better::Lower);
        s.push(Side::Ferrovirt, 73.0);
        s.push(Side::Peer, 26.0);
        let rows = vec![s.summarize("floor").unwrap()];
        let goal = Goal::above_peer_at_most("prog", 50.0, "≤ 50 ns");
        assert_eq!(goal.check(&rows), Some((true, 47.0)));
        let strict = Goal::above_peer_at_most("prog", 40.0, "≤ 40 ns");
        assert_eq!(strict.check(&rows), Some((false, 47.0)));
    }

    #[test]
    fn row_serializes_with_the_agreed_field_names() {
        let row = ResultRow {
            name: "n".into(),
            unit: "ms".into(),
            ferrovirt: 1.0,
            peer: 2.0,
            peer_name: "QEMU".into(),
            ratio: Some(0.5),
            better: Better::Lower,
        };
        let v = serde_json::to_value(&row).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name": "n", "unit": "ms", "ferrovirt": 1.0, "peer": 2.0,
                "peer_name": "QEMU", "ratio": 0.5, "better": "lower"})
        );
    }
}
