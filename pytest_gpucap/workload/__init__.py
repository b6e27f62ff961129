"""Agent-style workloads: roles and workflows, synthetic prompts, the streaming client and runners."""
