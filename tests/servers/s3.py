"""A real S3-compatible server on 127.0.0.1 for the test suite (moto's S3, SNS and SQS).

moto answers a conditional PUT (`If-None-Match: *`) with 412 when the key exists, but its check-then-put
holds no lock, so two concurrent creates of one key can both succeed, which AWS S3 and MinIO never allow.
This server runs moto's WSGI app behind one lock held for each whole request, which makes every request,
and so every conditional PUT, atomic.

With `--auth`, requests are checked against IAM like AWS does: the server creates one user with full
access and prints its keys; any other key is refused with InvalidAccessKeyId.

Usage: python s3.py PORT [--auth] [--ignore-conditional-writes]. Prints one JSON line when it listens: {"port": ..., "access_key_id": ...,
"secret_access_key": ...}.
"""

import json
import os
import sys
import threading

AUTH = "--auth" in sys.argv
# Plays a server that ignores conditional writes (as garage and s3rver do), for the refusal test. The
# header is signed, so use it without --auth.
IGNORE_CONDITIONAL = "--ignore-conditional-writes" in sys.argv
if AUTH:
    # Read by moto at import: authenticate and authorize every request.
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"

from urllib.parse import quote, unquote  # noqa: E402

from moto.iam import access_control  # noqa: E402
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

_create_aws_request = access_control.IAMRequestBase._create_aws_request


def _signed_query_as_sent(self):
    """moto checks SigV4 signatures on the decoded path and query (`txn_year=2019`, `prefix=a/b`), while
    clients sign them encoded (`txn_year%3D2019`, `prefix=a%2Fb`), so a key with `=` or a listing with a
    `/` in its prefix fails with SignatureDoesNotMatch (a moto bug). Encode them the way SigV4 specifies
    before the check."""
    path, mark, query = self._path.partition("?")
    path = quote(unquote(path), safe="/-_.~")
    self._path = path + mark + query
    if query:
        pairs = (pair.partition("=") for pair in query.split("&"))
        query = "&".join(
            quote(unquote(k), safe="-_.~") + eq + quote(unquote(v), safe="-_.~") for k, eq, v in pairs
        )
        self._path = path + mark + query
    return _create_aws_request(self)


access_control.IAMRequestBase._create_aws_request = _signed_query_as_sent


class Serialized:
    """One request at a time, body and response included."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if IGNORE_CONDITIONAL:
            environ.pop("HTTP_IF_NONE_MATCH", None)
        with self.lock:
            result = self.app(environ, start_response)
            try:
                return [b"".join(result)]
            finally:
                close = getattr(result, "close", None)
                if close:
                    close()


def user_keys():
    """An IAM user allowed everything, created directly in moto's backend."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends

    iam = iam_backends[DEFAULT_ACCOUNT_ID]["global"]
    iam.create_user(region_name="us-east-1", user_name="medallion", path="/")
    iam.put_user_policy(
        "medallion",
        "all",
        json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        ),
    )
    key = iam.create_access_key("medallion")
    return key.access_key_id, key.secret_access_key


def main():
    port = int(sys.argv[1])
    app = Serialized(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, app, threaded=True)
    key_id, secret = user_keys() if AUTH else ("test", "test")
    print(json.dumps({"port": port, "access_key_id": key_id, "secret_access_key": secret}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
