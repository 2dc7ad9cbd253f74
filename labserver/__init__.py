"""labserver: a lab that measures why LLM servers stream tokens, and the small streaming server it runs.

The public API the notebooks use is re-exported here; each name lives in the module named after it.
"""

from .config import EngineConfig, SamplingParams
from .engine import Completion, Engine, Finish, PromptTooLong, TokenEvent, collect
from .fake_engine import FakeEngine
from .model import ModelNotFound, load_model_and_tokenizer
from .variants import BlockingBackend, ExecutorBackend, make_backend
from .worker import EngineWorker
from .scheduler import BatchScheduler
from .fastapi_app import create_app
from .limits import ServerLimits
from .flask_app import create_flask_app
from .serving import FlaskServer, ServerStartError, UvicornServer, start_fastapi, start_flask, stop_all

__all__ = [
    "BatchScheduler",
    "EngineConfig", "SamplingParams", "Engine", "TokenEvent", "Finish", "Completion", "PromptTooLong",
    "collect", "FakeEngine", "ModelNotFound", "load_model_and_tokenizer", "EngineWorker",
    "ExecutorBackend", "BlockingBackend", "make_backend", "create_app", "create_flask_app", "UvicornServer",
    "FlaskServer", "ServerStartError", "start_fastapi", "start_flask", "stop_all", "ServerLimits",
]
