"""A personalized reward server: every user's reward phi^T V w_user over HTTP, each user learned
online from its answers (lore.reward.PersonalReward), the answers kept in SQLite.

    python tools/serve.py --checkpoint PersonalLLM/results/train_basis/lore_K5_alpha0.safetensors \\
        --model Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 --db rewards.db [--host 127.0.0.1] [--port 8000] \\
        [--token-file token.txt] [--migrate]

Reads the checkpoint (its basis V and the seen users' weights W, whose mean is a new user's prior)
and the reward model its data was embedded with. Reads and writes --db, an SQLite database in WAL
mode: every answer (user, prompt, chosen, rejected), committed before it is acknowledged, and the
identity of the checkpoint (sha256 of the file) and of the reward model (lore.reward.model_identity)
with this run's flags. At start every stored answer is embedded again and every user refitted (one
fit for all): a user's weights are a function of its answers and the checkpoint, so a restart,
after kill -9 or not, gives the same weights. A database written with another checkpoint or model
is refused; --migrate refits its answers on this one and records it. One server per database.

JSON endpoints (OpenAPI docs at /docs; a prompt is a string or a list of {"role", "content"}):
    GET  /health                       status, checkpoint, model, K, F, users, answers, cache, embedding
                                       (batches run and conversations in them: requests batched together)
    POST /v1/rewards                   {"user": optional, "prompt", "responses": [...]} -> {"rewards": [...]}
    POST /v1/users/{user}/preferences  {"prompt", "chosen", "rejected"} -> {"user", "weights", "answers"}
    POST /v1/users/{user}/question     {"prompt", "responses": [...]} -> {"pair": [i, j], "information"}
    GET  /v1/users/{user}              {"user", "weights", "answers", "prior"}
    POST /get_reward                   OpenRLHF's remote reward model: {"query": [texts], "user": optional}
                                       -> {"rewards": [...], "scores": the same} (queries as the policy
                                       rendered them, tokenized as they are)
Safe by default: it binds 127.0.0.1; with --token-file every request needs `Authorization: Bearer
<token>` (else 401); bodies over --max-body bytes get 413; bad fields get 422 with a JSON error
naming the field; no traceback is ever sent.
"""
import hashlib
import hmac
import json
import os
import sqlite3
import sys
import threading
import traceback
from typing import Annotated, Literal, Optional, Union

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lore.checks import InputError  # noqa: E402
from lore.cli import ArgumentParser, command_line, positive_int  # noqa: E402
from lore.extract import DEFAULT_MODEL  # noqa: E402
from lore.reward import MAX_USER_CHARS, PersonalReward, conversation, model_identity  # noqa: E402

MAX_BODY = 1 << 20        # bytes of a request body
MAX_CHARS = 32_768        # characters of one prompt, response, message or query
MAX_RESPONSES = 64        # responses of one /v1/rewards or question request
MAX_QUERIES = 256         # queries of one /get_reward request
MAX_MESSAGES = 64         # messages of one prompt
SCHEMA = "1"


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--checkpoint", required=True, help="{method}_K{K}[_alpha{a}].safetensors of a train_basis.py")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the reward model: hub id or local folder")
    p.add_argument("--db", required=True, help="SQLite file of the users' answers (created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port")
    p.add_argument("--token-file", default=None, help="file holding a bearer token every request must carry")
    p.add_argument("--migrate", action="store_true", help="refit a database written with another checkpoint or model")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--cache-size", type=int, default=4096, help="embeddings kept in the LRU cache (0: none)")
    p.add_argument("--batch-tokens", type=positive_int, default=16384, help="padded tokens per forward pass")
    p.add_argument("--max-body", type=positive_int, default=MAX_BODY, help="largest request body in bytes")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The answers: SQLite in WAL mode, one connection behind a lock, a commit per answer
# ----------------------------------------------------------------------------------------------

class AnswerStore:
    """The users' answers in an SQLite file, and what they were fitted with (table meta)."""

    def __init__(self, path):
        try:
            self.db = sqlite3.connect(path, check_same_thread=False, timeout=1.0, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")         # an acknowledged answer survives a power cut
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")   # one server per database: a second one is refused
            self.db.execute("BEGIN EXCLUSIVE")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS answers (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                            "user TEXT NOT NULL, prompt TEXT NOT NULL, chosen TEXT NOT NULL, rejected TEXT NOT NULL)")
            self.db.execute("CREATE INDEX IF NOT EXISTS answers_user ON answers (user, id)")
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            raise InputError(f"--db {path}: {e} (in use by another server, or not an SQLite database)") from None
        self.path, self.lock = path, threading.Lock()

    def meta(self):
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def check_identity(self, identity, migrate):
        """The database's checkpoint and model weights are identity's (a new database records
        them); else InputError, or with migrate the new identity recorded (the caller refits)."""
        recorded = self.meta()
        differ = [k for k in ("checkpoint", "model_weights") if k in recorded and recorded[k] != identity[k]]
        if differ:
            which = " and ".join({"checkpoint": "checkpoint", "model_weights": "reward model"}[k] for k in differ)
            if not migrate:
                raise InputError(f"--db {self.path} holds answers fitted with another {which} "
                                 f"({recorded.get('checkpoint_path', '?')}, {recorded.get('model', '?')}): "
                                 f"pass --migrate to refit them on this one")
            print(f"--migrate: {self.path}'s answers refitted on the new {which}", file=sys.stderr)
        self.put_meta(identity)

    def put_meta(self, values):
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", sorted(values.items()))
            self.db.execute("COMMIT")

    def add(self, user, prompt, chosen, rejected):
        """One answer, committed when this returns."""
        with self.lock:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO answers (user, prompt, chosen, rejected) VALUES (?, ?, ?, ?)",
                            (user, json.dumps(prompt), json.dumps(chosen), json.dumps(rejected)))
            self.db.execute("COMMIT")

    def answers(self):
        """Every answer in the order committed: [(user, prompt, chosen, rejected)]."""
        with self.lock:
            rows = self.db.execute("SELECT user, prompt, chosen, rejected FROM answers ORDER BY id").fetchall()
        return [(u, json.loads(p), json.loads(c), json.loads(r)) for u, p, c, r in rows]

    def count(self):
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self):
        with self.lock:
            self.db.close()


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------

def create_app(reward, store, identity, token=None, max_body=MAX_BODY):
    """The FastAPI app of a PersonalReward and its AnswerStore."""
    from fastapi import FastAPI, Path
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, StringConstraints

    Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHARS)]
    UserId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_USER_CHARS, pattern=r"^[^\x00-\x1f\x7f]+$")]
    UserPath = Annotated[str, Path(min_length=1, max_length=MAX_USER_CHARS, pattern=r"^[^\x00-\x1f\x7f/]+$")]

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    class Message(Strict):
        role: Literal["system", "user", "assistant"]
        content: Text

    Prompt = Union[Text, Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]]

    class RewardsRequest(Strict):
        user: Optional[UserId] = None
        prompt: Prompt
        responses: Annotated[list[Text], Field(min_length=1, max_length=MAX_RESPONSES)]

    class Preference(Strict):
        prompt: Prompt
        chosen: Text
        rejected: Text

    class Question(Strict):
        prompt: Prompt
        responses: Annotated[list[Text], Field(min_length=2, max_length=MAX_RESPONSES)]

    class Queries(BaseModel):   # OpenRLHF sends more fields (prompts, labels): ignored
        model_config = ConfigDict(extra="ignore", strict=True)
        query: Annotated[list[Text], Field(min_length=1, max_length=MAX_QUERIES)]
        user: Optional[Union[UserId, Annotated[list[Optional[UserId]], Field(max_length=MAX_QUERIES)]]] = None

    app = FastAPI(title="LoRe personalized reward", version=SCHEMA,
                  description="phi^T V w_user for every user, learned online from its answers (tools/serve.py).")

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        errors = [{"field": field_of(e), "message": e["msg"]} for e in exc.errors()]   # never the input: 1 MB of text
        first = errors[0] if errors else {"field": "body", "message": "invalid"}
        return JSONResponse({"error": f"{first['field']}: {first['message']}", "field": first["field"].split(".")[0],
                             "errors": errors[:20]}, status_code=422)

    @app.exception_handler(InputError)
    async def bad_input(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request, exc):
        traceback.print_exception(exc, file=sys.stderr)   # in the server's log, not in the answer
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    def prompt_value(prompt):
        return prompt if isinstance(prompt, str) else [m.model_dump() for m in prompt]

    def weights_of(user):
        w, n = reward.weights(user)
        return {"user": user, "weights": w.tolist(), "answers": n, "prior": n == 0}

    @app.get("/health")
    def health():
        return {"status": "ok", "checkpoint": identity["checkpoint_path"], "checkpoint_sha256": identity["checkpoint"],
                "model": identity["model"], "K": reward.K, "F": reward.method.V.shape[0],
                "users": len(reward.user_ids()), "answers": store.count(), "cache": reward.cache.stats(),
                "embedding": {"batches": reward.forwards, "conversations": reward.embedded}}

    @app.post("/v1/rewards")
    def rewards(body: RewardsRequest):
        prompt = prompt_value(body.prompt)
        scores = reward.rewards([body.user] * len(body.responses),
                                [conversation(prompt, r, f"responses[{k}]") for k, r in enumerate(body.responses)])
        return {"rewards": scores}

    @app.post("/v1/users/{user}/preferences")
    def preference(user: UserPath, body: Preference):
        if body.chosen == body.rejected:
            raise InputError("chosen and rejected are the same response: the answer tells nothing")
        w, n = reward.add_preference(user, prompt_value(body.prompt), body.chosen, body.rejected, store=store.add)
        return {"user": user, "weights": w.tolist(), "answers": n, "prior": False}   # this answer's fit

    @app.post("/v1/users/{user}/question")
    def question(user: UserPath, body: Question):
        i, j, info = reward.next_question(user, prompt_value(body.prompt), body.responses)
        return {"pair": [i, j], "information": info}

    @app.get("/v1/users/{user}")
    def user_weights(user: UserPath):
        return weights_of(user)

    @app.post("/get_reward")
    def get_reward(body: Queries):
        users = body.user if isinstance(body.user, list) else [body.user] * len(body.query)
        if len(users) != len(body.query):
            raise InputError(f"user has {len(users)} entries for {len(body.query)} queries")
        scores = reward.rewards(users, body.query, texts=True)
        return {"rewards": scores, "scores": scores, "extra_logs": {}}   # newer OpenRLHF reads "scores"

    return Guard(app, token, max_body)


def field_of(error):
    """The field a pydantic error is about, as "responses.3" or "prompt.0.role": its location
    without "body" or "path" and without the names of a union's members ("constrained-str")."""
    if error["type"] == "json_invalid":
        return "body"
    loc = [str(x) for x in error["loc"][1:] if not (isinstance(x, str) and ("[" in x or x.startswith("constrained")))]
    return ".".join(loc) or "body"


class Guard:
    """ASGI middleware in front of the app: the bearer token (401 without it, before anything is
    read), JSON bodies only (415), and the body's size (413 past max_body bytes, counted as they
    arrive, not trusted from Content-Length)."""

    def __init__(self, app, token, max_body):
        self.app, self.max_body = app, max_body
        self.token = None if token is None else f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse
        headers = dict(scope["headers"])
        if self.token is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.token):
            return await JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                                      status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if scope["method"] == "POST" and not headers.get(b"content-type", b"").startswith(b"application/json"):
            return await JSONResponse({"error": "the body must be JSON (Content-Type: application/json)"},
                                      status_code=415)(scope, receive, send)
        too_large = JSONResponse({"error": f"request body over {self.max_body} bytes"}, status_code=413)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return   # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await too_large(scope, receive, send)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, replay, send)


def build(args):
    """-> (app, reward, store): the checked flags, the database opened and checked, every stored
    answer refitted, the app ready to serve (main runs it with uvicorn; the tests too, in a thread)."""
    token = None
    if args.token_file is not None:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise InputError(f"--token-file {args.token_file}: {e.strerror}") from None
        if not token or not token.isprintable() or any(c.isspace() for c in token):
            raise InputError(f"--token-file {args.token_file}: the token must be one non-empty printable word")
    if not os.path.isfile(args.checkpoint):
        raise InputError(f"--checkpoint {args.checkpoint}: no such file")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: not a port")
    if args.cache_size < 0:
        raise InputError(f"--cache-size {args.cache_size}: must be >= 0")
    store = AnswerStore(args.db)   # first: a database in use is refused before the model loads
    try:
        reward = PersonalReward.from_checkpoint(args.checkpoint, args.model, args.device,
                                                cache_size=args.cache_size, batch_tokens=args.batch_tokens)
        model = model_identity(reward.model)
        identity = {"checkpoint": file_sha256(args.checkpoint), "checkpoint_path": os.path.abspath(args.checkpoint),
                    "model": model["model"], "model_weights": model["weights"]}
        store.check_identity(identity, args.migrate)
        store.put_meta({"schema": SCHEMA, "config": json.dumps(vars(args))})
        answers = store.answers()
        reward.restore(answers)
    except BaseException:
        store.close()
        raise
    print(f"{len(answers)} answers of {len(reward.user_ids())} users refitted from {args.db}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"warning: serving on {args.host} without --token-file: anyone who can reach it can write answers",
              file=sys.stderr)
    return create_app(reward, store, identity, token, args.max_body), reward, store


@command_line
def main(args):
    import uvicorn
    app, _, _ = build(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)


if __name__ == "__main__":
    main(parse_args())
