"""Kubernetes settings carried by the definitions; ignored unless a Kubernetes launcher or executor runs them.

The embedding step asks for one GPU and lands on GPU nodes (dagster-k8s reads the
`dagster-k8s/config` op tag for the step's pod); every other step runs on ordinary nodes.
"""

# Label your GPU node pool with clip-assets/gpu=true (or change the selector); the toleration lets
# the pod onto nodes tainted nvidia.com/gpu, as GKE and EKS GPU pools are by default.
GPU_STEP_K8S_CONFIG = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"cpu": "4", "memory": "16Gi"}}},
    "pod_spec_config": {
        "node_selector": {"clip-assets/gpu": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}
