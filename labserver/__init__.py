"""labserver: a lab that measures why LLM servers stream tokens, and the small streaming server it runs.

The public API the notebooks use is re-exported here; each name lives in the module named after it.
"""

from .config import EngineConfig, SamplingParams
from .engine.engine import Engine
from .engine.prompts import PromptTooLong
from .engine.sequence import Completion, Finish, TokenEvent, collect
from .engine.fake import FakeRunner, fake_engine
from .engine.loading import ModelNotFound, load_model_and_tokenizer
from .serve.backends import BlockingBackend, ExecutorBackend, make_backend
from .engine.core import EngineCore
from .engine.scheduler import Batched, TurnTaking
from .serve.app import create_app
from .serve.limits import ServerLimits
from .serve.flask_app import create_flask_app
from .serve.background import FlaskServer, ServerStartError, UvicornServer, start_fastapi, start_flask, stop_all

__all__ = [
    "EngineConfig", "SamplingParams", "Engine", "TokenEvent", "Finish", "Completion", "PromptTooLong",
    "collect", "FakeRunner", "fake_engine", "ModelNotFound", "load_model_and_tokenizer", "EngineCore",
    "TurnTaking", "Batched",
    "ExecutorBackend", "BlockingBackend", "make_backend", "create_app", "create_flask_app", "UvicornServer",
    "FlaskServer", "ServerStartError", "start_fastapi", "start_flask", "stop_all", "ServerLimits",
]
