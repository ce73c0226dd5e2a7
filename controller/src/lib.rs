//! Kubernetes CRDs, the cluster controller, the node agent and fvctl (see issues: controller, node).
