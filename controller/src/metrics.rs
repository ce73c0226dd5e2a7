//! Prometheus metrics of the controller, served on `/metrics` by [`crate::server`].
//!
//! Names follow the `ferrovirt_controller_*` / `ferrovirt_vmi_*` pattern; the phase-transition
//! histogram mirrors KubeVirt's `kubevirt_vmi_phase_transition_time_from_creation_seconds`, so
//! dashboards built for one read the other.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Reconcile durations: 1 ms .. ~16 s.
fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Phase transition times: 50 ms .. ~7 min, the range a VM start spans.
fn phase_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    durations: HistogramFamily,
    phase_from_creation: HistogramFamily,
    leader: Gauge,
    api_requests: Counter,
    /// Serialises encoders; `encode` needs `&Registry` only, but one scrape at a time is plenty.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let durations =
            HistogramFamily::new_with_constructor(reconcile_histogram as fn() -> Histogram);
        let phase_from_creation =
            HistogramFamily::new_with_constructor(phase_histogram as fn() -> Histogram);
        let leader = Gauge::default();
        let api_requests = Counter::default();
        registry.register(
            "ferrovirt_controller_api_requests",
            "Requests this process sent to the API server (watches count once)",
            api_requests.clone(),
        );
        registry.register(
            "ferrovirt_controller_reconcile",
            "Reconciliations run, by kind",
            reconciles.clone(),
        );
        registry.register(
            "ferrovirt_controller_reconcile_errors",
            "Reconciliations that failed, by kind and error",
            errors.clone(),
        );
        registry.register(
            "ferrovirt_controller_reconcile_duration_seconds",
            "Time spent in one reconciliation, by kind",
            durations.clone(),
        );
        registry.register(
            "ferrovirt_vmi_phase_transition_time_seconds",
            "Time from a VMI's creation to its entering a phase, by phase",
            phase_from_creation.clone(),
        );
        registry.register(
            "ferrovirt_controller_leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            durations,
            phase_from_creation,
            leader,
            api_requests,
            scrape: Mutex::new(()),
        }
    }

    /// Records one reconciliation of `kind` that took `took`; `error` names its failure, if any.
    pub fn reconciled(&self, kind: &'static str, took: Duration, error: Option<&'static str>) {
        let labels = vec![("kind", kind.to_owned())];
        self.reconciles.get_or_create(&labels).inc();
        self.durations
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(error) = error {
            self.errors
                .get_or_create(&vec![
                    ("kind", kind.to_owned()),
                    ("error", error.to_owned()),
                ])
                .inc();
        }
    }

    /// Records that a VMI entered `phase` `since_creation` after it was created.
    pub fn phase_entered(&self, phase: &str, since_creation: Duration) {
        self.phase_from_creation
            .get_or_create(&vec![("phase", phase.to_owned())])
            .observe(since_creation.as_secs_f64());
    }

    /// A handle that counts API requests (the client's request layer holds one).
    pub fn api_request_counter(&self) -> Counter {
        self.api_requests.clone()
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let _one = self
            .scrape
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_carries_counts_errors_and_phase_histograms() {
        let m = Metrics::new();
        m.reconciled("vmi", Duration::from_millis(3), None);
        m.reconciled("vmi", Duration::from_millis(5), Some("kube"));
        m.phase_entered("Scheduled", Duration::from_millis(700));
        m.set_leader(true);
        m.api_request_counter().inc();
        let text = m.render();
        assert!(
            text.contains("ferrovirt_controller_reconcile_total{kind=\"vmi\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "ferrovirt_controller_reconcile_errors_total{kind=\"vmi\",error=\"kube\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "ferrovirt_vmi_phase_transition_time_seconds_count{phase=\"Scheduled\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("ferrovirt_vmi_phase_transition_time_seconds_bucket{le=\"0.8\",phase=\"Scheduled\"} 1")
                || text.contains("phase=\"Scheduled\",le=\"0.8\"} 1"),
            "{text}"
        );
        assert!(text.contains("ferrovirt_controller_leader 1"), "{text}");
        assert!(
            text.contains("ferrovirt_controller_api_requests_total 1"),
            "{text}"
        );
    }
}
