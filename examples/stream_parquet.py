"""Stream a Parquet file through Keel and write the rows back with their embeddings.

    python examples/stream_parquet.py IN.parquet OUT.parquet [--text-column text]
        [--template "{gene} {chrom}:{pos} {ref}>{alt} {consequence}"] [--server grpc://127.0.0.1:50051]

Only pyarrow is needed. The writer runs on this thread and the reader on another: a
DoExchange client that writes without reading deadlocks once the HTTP/2 windows fill.
"""
import argparse
import json
import threading

import pyarrow.flight as flight
import pyarrow.parquet as pq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--server", default="grpc://127.0.0.1:50051")
    ap.add_argument("--text-column")
    ap.add_argument("--template")
    ap.add_argument("--batch-rows", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()

    command = {}
    if args.text_column:
        command["text_column"] = args.text_column
    if args.template:
        command["template"] = args.template
    descriptor = (flight.FlightDescriptor.for_command(json.dumps(command)) if command
                  else flight.FlightDescriptor.for_path("embed"))

    source = pq.ParquetFile(args.input)
    client = flight.connect(args.server)
    writer, reader = client.do_exchange(descriptor, options=flight.FlightCallOptions(timeout=args.timeout))

    result = {"rows": 0, "error": None}

    def read():
        out = None
        try:
            for chunk in reader:
                if out is None:
                    out = pq.ParquetWriter(args.output, chunk.data.schema)
                out.write_batch(chunk.data)
                result["rows"] += chunk.data.num_rows
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e
        finally:
            if out is not None:
                out.close()

    t = threading.Thread(target=read)
    t.start()
    writer.begin(source.schema_arrow)
    for batch in source.iter_batches(batch_size=args.batch_rows):
        writer.write_batch(batch)
    writer.done_writing()
    t.join()
    writer.close()
    if result["error"]:
        raise SystemExit(f"keel: {result['error']}")
    print(f"{result['rows']} rows with embeddings written to {args.output}")


if __name__ == "__main__":
    main()
