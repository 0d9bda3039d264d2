"""Post-training on the pretraining runtime: chat/think templates and jsonl data (templates, data),
the generation engine with a KV cache (generate), rule-based rewards and a sandbox for code
(rewards, sandbox), verifiable tasks (tasks), the objectives (objectives), and the stages as
`python -m posttrain.<stage>` CLIs (sft, grpo, rejection, dpo, distill) sharing one stage session (stage:
StageSession on pretrain.session's Session: mesh, policy, AdamW, checkpoints, metrics), and the demonstration
(demo).
"""
