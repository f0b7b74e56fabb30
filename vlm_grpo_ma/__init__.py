"""vlm-grpo-ma: GRPO-MA (multi-answer GRPO) for Qwen-VL models on embodied reasoning tasks."""

from vlm_grpo_ma.task import ParseError, Reward, Task, available_tasks, get_task, register_task

__version__ = "0.1.0"
__all__ = ["ParseError", "Reward", "Task", "available_tasks", "get_task", "register_task", "__version__"]
