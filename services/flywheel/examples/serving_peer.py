"""The peer of `serving_bench.rs`: PyTorch + transformers + PEFT serving the same adapter.

    python serving_peer.py BASE_MODEL_DIR ADAPTER_DIR PORT

Loads the base model with PEFT's adapter (merged into the weights, as PEFT recommends for
inference), the classifier head flywheel exports beside it (`classifier_head.safetensors`,
mean pooling), and answers `POST /predict {"input": "..."}` with the label and its probability.
Requests wait in a queue that one worker thread drains into batches of up to 64, the same
dynamic batching flywheel's serving does, so the two are compared as engines, not as batching
strategies. Threads: torch's intra-op pool at the machine's cores.
"""

import json
import os
import queue
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

base_dir, adapter_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(os.cpu_count() or 1)
config = json.load(open(os.path.join(adapter_dir, "classifier_config.json")))
labels = config["labels"]
max_len = int(config.get("max_seq_len", 128))
tokenizer = AutoTokenizer.from_pretrained(base_dir)
model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), adapter_dir)
model = model.merge_and_unload().eval()
head = load_file(os.path.join(adapter_dir, "classifier_head.safetensors"))
weight, bias = head["classifier.weight"], head["classifier.bias"]

work: "queue.Queue[tuple[str, dict]]" = queue.Queue()


def serve_batches() -> None:
    while True:
        batch = [work.get()]
        while len(batch) < 64:
            try:
                batch.append(work.get_nowait())
            except queue.Empty:
                break
        texts = [text for text, _ in batch]
        with torch.inference_mode():
            enc = tokenizer(
                texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            probs = torch.softmax(pooled @ weight.T + bias, dim=-1)
            conf, idx = probs.max(dim=-1)
        for (_, slot), c, i in zip(batch, conf.tolist(), idx.tolist()):
            slot["answer"] = {"output": labels[i], "confidence": c}
            slot["done"].set()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle's algorithm and delayed ACKs
    # add ~40 ms to every answer.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # quiet
        pass

    def reply(self, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self.reply(200, {"ok": True})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        slot = {"done": threading.Event()}
        work.put((body["input"], slot))
        slot["done"].wait()
        self.reply(200, slot["answer"])


threading.Thread(target=serve_batches, daemon=True).start()
ThreadingHTTPServer.daemon_threads = True
print(f"peer ready on {port}", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
