"""The engine: the step loop over scheduler, runner and sampler (`LLMEngine`), the offline API
(`LLM`) and the engine on its own thread for the server (`AsyncEngine`)."""

from edgert.config import EngineConfig
from edgert.engine.llm import LLM, Choice, Completion
from edgert.engine.llm_engine import LLMEngine

__all__ = ["LLM", "Choice", "Completion", "EngineConfig", "LLMEngine"]
