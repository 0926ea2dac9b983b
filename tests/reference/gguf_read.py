"""Read a GGUF file with llama.cpp's gguf-py (`gguf.GGUFReader`) and print
its metadata and tensor table as JSON, to check that files posttrain
writes are readable by llama.cpp's own tooling.

Output: {"version", "alignment", "data_offset",
         "metadata": {key: {"type", "value"}},   # arrays: "element_type",
                                                  # "length", first 8 values
         "tensors": [{"name", "shape" (PyTorch order), "dims" (GGUF order),
                      "type", "n_bytes", "data_offset"}]}

usage: python3 gguf_read.py FILE.gguf
"""
import json
import sys

from gguf import GGUFReader, GGUFValueType

SHOWN = 8


def field_json(field):
    main = GGUFValueType(field.types[0])
    if main == GGUFValueType.ARRAY:
        values = field.contents() if len(field.types) > 1 else []
        return {
            "type": main.name,
            "element_type": GGUFValueType(field.types[-1]).name if len(field.types) > 1 else None,
            "length": len(field.data),
            "value": [plain(v) for v in values[:SHOWN]],
        }
    return {"type": main.name, "value": plain(field.contents())}


def plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def main():
    reader = GGUFReader(sys.argv[1])
    version = int(reader.fields["GGUF.version"].parts[-1][0])
    metadata = {key: field_json(f) for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = [
        {
            "name": t.name,
            "shape": [int(d) for d in reversed(t.shape.tolist())],
            "dims": [int(d) for d in t.shape.tolist()],
            "type": t.tensor_type.name,
            "n_bytes": int(t.n_bytes),
            "data_offset": int(t.data_offset),
        }
        for t in reader.tensors
    ]
    out = {
        "version": version,
        "alignment": int(reader.alignment),
        "data_offset": int(reader.data_offset),
        "metadata": metadata,
        "tensors": tensors,
    }
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
