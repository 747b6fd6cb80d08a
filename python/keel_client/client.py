"""A Keel client over Arrow Flight, with pyarrow only."""
from __future__ import annotations

import collections
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.flight as flight

from .contract import EmbedCommand, PutAck, dataset_descriptor, embed_descriptor

Data = Union[pa.Table, pa.RecordBatch, pa.RecordBatchReader, Iterable[pa.RecordBatch], str, "os.PathLike[str]"]

# Errors after which a stream is sent again, to the next address: the server went away
# or is draining. Anything else (a bad column, a refused token) is the caller's to fix.
_RETRYABLE = (flight.FlightUnavailableError, flight.FlightCancelledError, ConnectionError)


class _SourceFailed(Exception):
    """The caller's batches raised `error` while a stream read them: raised to the caller
    as it is, never taken for a server going away."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


# Statuses pyarrow raises as a generic Arrow error (ArrowInvalid, ArrowKeyError, ...),
# told apart by the words it puts before the server's message.
_STATUS_WORDS = (
    ("resource exhausted error", "ResourceExhausted"),
    ("precondition failed error", "FailedPrecondition"),
    ("aborted error", "Aborted"),
    ("out-of-range error", "OutOfRange"),
    ("data loss error", "DataLoss"),
    ("not found error", "NotFound"),
    ("already exists error", "AlreadyExists"),
    ("unimplemented error", "Unimplemented"),
    ("invalid argument error", "InvalidArgument"),
)


def _code(e: BaseException) -> str:
    """The gRPC status a pyarrow exception stands for, by name."""
    message = str(e)
    for words, code in _STATUS_WORDS:
        if f"returned {words}, with message" in message:
            return code
    if isinstance(e, pa.ArrowInvalid):
        return "InvalidArgument"
    return {
        "FlightUnauthenticatedError": "Unauthenticated",
        "FlightUnauthorizedError": "PermissionDenied",
        "FlightUnavailableError": "Unavailable",
        "FlightTimedOutError": "DeadlineExceeded",
        "FlightCancelledError": "Cancelled",
        "FlightServerError": "ServerError",
        "FlightInternalError": "Internal",
    }.get(type(e).__name__, type(e).__name__)


def _busy(e: BaseException) -> bool:
    """Keel refused the stream for now (`server.max_streams` open, or
    `ingest.when_full: reject` with the in-flight bound reached): another address, or the
    same one a little later, takes it. (A message over the size limit is also
    ResourceExhausted, and is not retried.)"""
    return _code(e) == "ResourceExhausted" and "retry" in str(e)


def _ended_unanswered(e: BaseException) -> bool:
    """pyarrow's own words for an exchange whose server ended it without a status or a
    single message (Keel always sends one or the other: its process went away)."""
    return isinstance(e, flight.FlightInternalError) and "Server never sent a data message" in str(e)


class KeelError(RuntimeError):
    """A call Keel refused or could not finish; `code` names the gRPC status
    (`InvalidArgument`, `Unauthenticated`, `Unavailable`, `ResourceExhausted`, ...)."""

    def __init__(self, message: str, code: str = "", address: str = ""):
        super().__init__(message)
        self.code = code
        self.address = address


def _batches(data: Data, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The record batches of any supported input, streamed (files are not read whole)."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        lower = path.lower()
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        elif lower.endswith((".arrow", ".feather", ".ipc")):
            import pyarrow.ipc as ipc

            with pa.memory_map(path) as source:
                try:
                    reader = ipc.open_file(source)
                    for i in range(reader.num_record_batches):
                        yield reader.get_batch(i)
                except pa.ArrowInvalid:
                    source.seek(0)
                    yield from ipc.open_stream(source)
        elif lower.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
            import pyarrow.csv as csv

            delimiter = "\t" if ".tsv" in lower else ","
            yield from csv.open_csv(path, parse_options=csv.ParseOptions(delimiter=delimiter))
        else:
            raise KeelError(f"{path}: not .parquet, .arrow/.feather/.ipc or .csv/.tsv")
    elif isinstance(data, pa.Table):
        yield from data.to_batches(max_chunksize=batch_rows)
    elif isinstance(data, pa.RecordBatch):
        yield data
    else:
        yield from data


class KeelClient:
    """Streams Arrow data through one or several Keel servers.

    addresses: one or several `grpc://host:port` (or `grpc+tls://host:port`). A table is
    split over them and the slices streamed concurrently; a slice whose server goes away
    is sent again to the next address, so every row comes back exactly once.
    token: a bearer token (`auth.mode: token`), sent as `authorization: Bearer ...`.
    tls_root_certs: PEM bytes, or a path to them, to trust a server's certificate.
    timeout: seconds a unary call (an action, a dataset's info, a search) may take.
    stream_timeout: seconds a whole stream (`embed`, `embed_stream`, `put`) may take;
    None (default): no deadline, as a Spark partition or a big file may stream for hours
    (a server that goes away still ends the stream, and it fails over).
    text_column / template: which text each row is embedded by (the server's default
    column when neither is given); see docs/FLIGHT.md.
    precision / dimensions: the vectors' format ("f32", "f16", "int8", "binary"; the
    first N dimensions at unit length); the server's defaults when not given.
    """

    def __init__(
        self,
        addresses: Union[str, Sequence[str]] = "grpc://127.0.0.1:50051",
        *,
        token: Optional[str] = None,
        tls_root_certs: Union[bytes, str, "os.PathLike[str]", None] = None,
        timeout: float = 300.0,
        stream_timeout: Optional[float] = None,
        text_column: Optional[str] = None,
        template: Optional[str] = None,
        batch_rows: int = 4096,
        retries: int = 2,
        precision: Optional[str] = None,
        dimensions: Optional[int] = None,
    ):
        self.addresses: List[str] = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self.addresses:
            raise ValueError("at least one address")
        if text_column and template:
            raise ValueError("text_column or template, not both")
        if isinstance(tls_root_certs, (str, os.PathLike)):
            with open(tls_root_certs, "rb") as f:
                tls_root_certs = f.read()
        self._tls_root_certs = tls_root_certs
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._options = flight.FlightCallOptions(timeout=timeout, headers=headers)
        self._stream_options = flight.FlightCallOptions(timeout=stream_timeout, headers=headers)
        self.text_column = text_column
        self.template = template
        self.precision = precision
        self.dimensions = dimensions
        self.batch_rows = batch_rows
        self.retries = retries
        self._clients: Dict[str, flight.FlightClient] = {}
        self._lock = threading.Lock()

    # -- connections ----------------------------------------------------------------

    def _client(self, address: str) -> flight.FlightClient:
        with self._lock:
            c = self._clients.get(address)
            if c is None:
                kwargs: Dict[str, Any] = {}
                if self._tls_root_certs:
                    kwargs["tls_root_certs"] = self._tls_root_certs
                c = flight.connect(address, **kwargs)
                self._clients[address] = c
            return c

    def _forget(self, address: str) -> None:
        with self._lock:
            c = self._clients.pop(address, None)
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - a broken connection may not close cleanly
                pass

    def close(self) -> None:
        for address in list(self._clients):
            self._forget(address)

    def __enter__(self) -> "KeelClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _command(self, text_column: Optional[str], template: Optional[str]) -> EmbedCommand:
        # A call's own choice of text replaces the client's (a template given to a call
        # on a client made with text_column, or the other way round).
        if text_column is None and template is None:
            text_column, template = self.text_column, self.template
        return EmbedCommand(
            text_column=text_column,
            template=template,
            precision=self.precision or None,
            dimensions=self.dimensions or None,
        )

    # -- embedding ------------------------------------------------------------------

    def _embed_slice(self, batches: List[pa.RecordBatch], command: EmbedCommand,
                     first: int) -> pa.Table:
        """A slice through `_stream` (addresses[first] first), as one table."""
        schema: List[pa.Schema] = []
        out = list(self._stream(iter(batches), command, first, schema))
        if not out:
            return pa.Table.from_batches([], schema=schema[0])
        return pa.Table.from_batches(out)

    def embed_stream(
        self,
        batches: Iterable[pa.RecordBatch],
        *,
        text_column: Optional[str] = None,
        template: Optional[str] = None,
        first: int = 0,
    ) -> Iterator[pa.RecordBatch]:
        """Embeds a stream of record batches through ONE DoExchange, yielding the answer's
        batches (every row with its `embedding`, in order) as the server sends them.

        Memory: the rows sent and not yet answered (Keel bounds those), never the whole
        stream. If the server goes away, only those rows (then the rest of the stream) go
        to the next address (`addresses[first]` first), so every row comes back exactly
        once. Closing the generator early cancels the exchange.
        """
        yield from self._stream(iter(batches), self._command(text_column, template), first)

    def _stream(self, source: Iterator[pa.RecordBatch], command: EmbedCommand, first: int,
                answer_schema: Optional[List[pa.Schema]] = None) -> Iterator[pa.RecordBatch]:
        """`embed_stream` with its command made; the answer's schema goes into
        `answer_schema` once the exchange ends (an empty answer still has one)."""
        head = next(source, None)
        if head is None:
            return
        # Input batches sent (or being sent) whose rows are not yet answered, oldest first.
        pending: "collections.deque[pa.RecordBatch]" = collections.deque([head])
        tries = len(self.addresses) * (self.retries + 1)
        last: Optional[BaseException] = None
        for k in range(tries):
            address = self.addresses[(first + k) % len(self.addresses)]
            try:
                yield from self._exchange_stream(address, head.schema, pending, source, command,
                                                 answer_schema)
                return
            except _SourceFailed as e:
                # The caller's own batches failed: not the server's failure to retry (a
                # source raising ConnectionError would otherwise end the stream short).
                raise e.error
            except _RETRYABLE as e:
                last = e
                self._forget(address)
            except (flight.FlightError, pa.ArrowException) as e:
                if _ended_unanswered(e):
                    # The server went away before answering (killed as the exchange
                    # began): like a lost connection, its pending rows go to the next.
                    last = e
                    self._forget(address)
                    continue
                if not _busy(e):
                    raise KeelError(str(e), _code(e), address) from e
                # Refused at admission, before any row was answered: every pending row
                # goes to the next address; once all were busy, back off.
                last = e
                cycle = (k + 1) // len(self.addresses)
                if (k + 1) % len(self.addresses) == 0 and k + 1 < tries:
                    time.sleep(min(0.25 * 2 ** (cycle - 1), 4.0))
        raise KeelError(f"no Keel server answered ({', '.join(self.addresses)}): {last}",
                        _code(last) if last else "Unavailable", "")

    def _exchange_stream(self, address: str, schema: pa.Schema,
                         pending: "collections.deque[pa.RecordBatch]",
                         source: Iterator[pa.RecordBatch],
                         command: EmbedCommand,
                         answer_schema: Optional[List[pa.Schema]] = None) -> Iterator[pa.RecordBatch]:
        """One DoExchange of `pending`, then of what `source` still holds (each batch
        joins `pending` before it is written), on a writer thread; answered rows leave
        `pending` as they are read here."""
        client = self._client(address)
        writer, reader = client.do_exchange(embed_descriptor(command),
                                            options=self._stream_options)
        lock = threading.Lock()
        failure: List[BaseException] = []
        source_failure: List[BaseException] = []
        # Set when the reading side stops early (the server's error, or the caller left):
        # the writer then makes no further call on the stream. `done_writing()` racing
        # the reader's end of a rejected exchange (or coming after `reader.cancel()`)
        # aborts the whole process inside gRPC, so the writer ends its side only once the
        # server has answered every row written (it answers each batch as it comes), or
        # the reader has stopped; and the reader cancels only once the writer has stopped,
        # or after a grace period if it is stuck in a write.
        stop = threading.Event()
        answered = threading.Condition(lock)

        def write() -> None:
            try:
                writer.begin(schema)
                with lock:
                    resend = list(pending)
                for b in resend:
                    if stop.is_set():
                        return
                    writer.write_batch(b)
                while True:
                    try:
                        b = next(source, None)
                    except BaseException as e:  # noqa: BLE001 - the caller's data failed
                        source_failure.append(e)
                        break
                    if b is None:
                        break
                    with lock:
                        # Taken from the source: pending from now on, written or not (a
                        # failover resends what is pending).
                        pending.append(b)
                    if stop.is_set():
                        break
                    writer.write_batch(b)
                with answered:
                    answered.wait_for(lambda: not pending or stop.is_set(), timeout=10.0)
                if not stop.is_set():
                    writer.done_writing()
            except BaseException as e:  # noqa: BLE001 - the reader has the server's reason
                failure.append(e)

        t = threading.Thread(target=write, daemon=True)
        t.start()
        finished = False
        try:
            for chunk in reader:
                out = chunk.data
                n = out.num_rows
                with lock:
                    while n > 0 and pending:
                        b = pending[0]
                        if b.num_rows <= n:
                            n -= b.num_rows
                            pending.popleft()
                        else:
                            pending[0] = b.slice(n)
                            n = 0
                    while pending and pending[0].num_rows == 0:
                        pending.popleft()
                    answered.notify_all()
                if out.num_rows:
                    yield out
            finished = True
            with lock:
                unanswered = sum(b.num_rows for b in pending)
            if unanswered:
                # The stream ended with rows unanswered: the server went away (a killed
                # server can end pyarrow's reading without an error). The writer stops
                # (it never ends its side on a dead stream) and the rows fail over.
                stop.set()
                with answered:
                    answered.notify_all()
            elif answer_schema is not None:
                answer_schema.append(reader.schema)
        finally:
            if not finished:
                stop.set()
                with answered:
                    answered.notify_all()
                t.join(timeout=2.0)
                reader.cancel()
            t.join()
            try:
                writer.close()
            except (flight.FlightError, pa.ArrowException):
                pass
        if source_failure:
            raise _SourceFailed(source_failure[0])
        left = sum(b.num_rows for b in pending)
        if left:
            # Retried on the next address with exactly these rows: none lost, none twice.
            raise ConnectionError(f"{address} ended the exchange with {left} rows unanswered")
        if failure:
            raise failure[0]

    def embed(
        self,
        data: Data,
        *,
        text_column: Optional[str] = None,
        template: Optional[str] = None,
    ) -> pa.Table:
        """Every row of `data` with its `embedding` column, in order.

        data: a Table, RecordBatch, RecordBatchReader, iterable of batches, or a path to a
        Parquet, Arrow IPC or CSV/TSV file. With several addresses the rows are split into
        as many contiguous slices, embedded concurrently.
        """
        command = self._command(text_column, template)
        batches = [b for b in _batches(data, self.batch_rows)]
        if not batches:
            raise KeelError("no record batch to embed (an empty reader has no schema)")
        schema = batches[0].schema
        rows = sum(b.num_rows for b in batches)
        n = min(len(self.addresses), max(1, rows))
        if n == 1:
            return self._embed_slice(batches, command, 0)
        table = pa.Table.from_batches(batches, schema=schema)
        size = -(-rows // n)
        slices = [table.slice(i * size, size).to_batches(max_chunksize=self.batch_rows) or
                  [pa.RecordBatch.from_pylist([], schema=schema)] for i in range(n)]
        with ThreadPoolExecutor(max_workers=n) as pool:
            parts = list(pool.map(lambda i: self._embed_slice(slices[i], command, i), range(n)))
        return pa.concat_tables(parts)

    def embed_to_parquet(
        self,
        data: Data,
        out: Union[str, "os.PathLike[str]"],
        *,
        text_column: Optional[str] = None,
        template: Optional[str] = None,
        chunk_rows: int = 65536,
    ) -> int:
        """Embeds `data` a chunk at a time into a Parquet file (memory: one chunk); returns
        the rows written."""
        import pyarrow.parquet as pq

        writer: Optional[pq.ParquetWriter] = None
        rows = 0
        pending: List[pa.RecordBatch] = []

        def flush() -> None:
            nonlocal writer, rows
            if not pending:
                return
            t = self.embed(pa.Table.from_batches(pending), text_column=text_column, template=template)
            pending.clear()
            if writer is None:
                writer = pq.ParquetWriter(os.fspath(out), t.schema)
            writer.write_table(t)
            rows += t.num_rows

        for b in _batches(data, self.batch_rows):
            pending.append(b)
            if sum(p.num_rows for p in pending) >= chunk_rows:
                flush()
        flush()
        if writer is not None:
            writer.close()
        return rows

    # -- datasets -------------------------------------------------------------------

    def put(
        self,
        data: Data,
        dataset: str,
        *,
        text_column: Optional[str] = None,
        template: Optional[str] = None,
        address: Optional[str] = None,
        expect_rows: Optional[int] = None,
    ) -> int:
        """Embeds `data` and stores it as (or appends it to) a dataset; returns the
        dataset's rows once every row sent is durable. With `expect_rows`, the rows are
        appended only onto a dataset of exactly that many rows (else `KeelError` with
        code `FailedPrecondition`): a put sent again after a lost connection cannot store
        its rows twice."""
        address = address or self.addresses[0]
        client = self._client(address)
        command = self._command(text_column, template)
        if expect_rows is not None:
            command = replace(command, expect_rows=expect_rows)
        descriptor = dataset_descriptor(dataset, command)
        batches = iter(_batches(data, self.batch_rows))
        first = next(batches, None)
        if first is None:
            raise KeelError("no record batch to store")
        try:
            writer, meta = client.do_put(descriptor, first.schema, options=self._stream_options)
            dataset_rows = 0
            for b in [first, *batches]:
                writer.write_batch(b)
            writer.done_writing()
            while True:
                buf = meta.read()
                if buf is None:
                    break
                dataset_rows = PutAck.parse(buf.to_pybytes()).dataset_rows
            writer.close()
            return dataset_rows
        except (flight.FlightError, pa.ArrowException) as e:
            raise KeelError(str(e), _code(e), address) from e

    def read(self, dataset: str, *, address: Optional[str] = None) -> pa.Table:
        """A stored dataset, every row with its embedding (a stream: `stream_timeout`)."""
        address = address or self.addresses[0]
        try:
            return self._client(address).do_get(flight.Ticket(dataset.encode()),
                                                 options=self._stream_options).read_all()
        except (flight.FlightError, pa.ArrowException) as e:
            raise KeelError(str(e), _code(e), address) from e

    # -- actions --------------------------------------------------------------------

    def action(self, name: str, body: Optional[Dict[str, Any]] = None, *,
               address: Optional[str] = None) -> Dict[str, Any]:
        """One Flight action (`health`, `stats`, `cleanup`, `search`): its JSON answer."""
        address = address or self.addresses[0]
        payload = json.dumps(body).encode() if body is not None else b""
        try:
            results = list(self._client(address).do_action(flight.Action(name, payload),
                                                           options=self._options))
        except (flight.FlightError, pa.ArrowException) as e:
            raise KeelError(str(e), _code(e), address) from e
        return json.loads(results[0].body.to_pybytes())

    def health(self, *, address: Optional[str] = None) -> Dict[str, Any]:
        return self.action("health", address=address)

    def stats(self, *, address: Optional[str] = None) -> Dict[str, Any]:
        return self.action("stats", address=address)
