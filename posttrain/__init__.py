"""Post-training on the pretraining runtime: chat/think templates and jsonl data (templates, data),
the generation engine with a KV cache (generate), rule-based rewards and a sandbox for code
(rewards, sandbox), verifiable tasks (tasks), the objectives (objectives), and the stages as
`python -m posttrain.<stage>` CLIs sharing one runtime (runtime: mesh, policy, AdamW, checkpoints,
metrics): sft and grpo so far; rejection sampling, distillation and DPO are still to come (issue 7).
"""
