"""Secrets never reach logs: DSNs, webhook URLs, headers."""

from dbevents.masking import mask_dsn, mask_headers, mask_url


def test_mask_dsn() -> None:
    assert mask_dsn("postgresql://app:s3cret@db:5432/app") == "postgresql://app:***@db:5432/app"
    assert mask_dsn("postgresql://app@db/app") == "postgresql://app@db/app"
    assert mask_dsn("mongodb://u:p%40ss@h1:27017,h2:27018/db?replicaSet=rs0") == \
        "mongodb://u:***@h1:27017,h2:27018/db?replicaSet=rs0"
    assert mask_dsn("mysql://root:@127.0.0.1:3306/x") == "mysql://root:***@127.0.0.1:3306/x"
    assert mask_dsn("postgresql://db/app?user=a&password=hunter2&sslmode=require") == \
        "postgresql://db/app?user=a&password=***&sslmode=require"
    assert mask_dsn("postgresql://u:p@ss@h/db") == "postgresql://u:***@h/db"
    assert mask_dsn("host=db port=5432 password=S3cretPW user=app") == \
        "host=db port=5432 password=*** user=app"
    assert mask_dsn("host=db password='a b\\'c' dbname=x") == "host=db password=*** dbname=x"
    assert mask_dsn("mongodb://h/db?tlsCertificateKeyFilePassword=pw&authMechanismProperties="
                    "AWS_SESSION_TOKEN:tok&replicaSet=rs0") == \
        "mongodb://h/db?tlsCertificateKeyFilePassword=***&authMechanismProperties=***" \
        "&replicaSet=rs0"


def test_mask_url_and_headers() -> None:
    assert mask_url("https://hooks.example.com/T0KEN/abc?sig=1") == "https://hooks.example.com/***"
    assert mask_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert mask_headers({"Authorization": "Bearer x", "X-Api-Key": "k", "Content-Type": "a"}) \
        == {"Authorization": "***", "X-Api-Key": "***", "Content-Type": "a"}


def test_mask_dsn_password_with_slash_colon_at() -> None:
    # The userinfo runs to the last "@": a "/" in the password must not end it.
    assert mask_dsn("postgresql://app:a/b:c@d%40e@127.0.0.1:5999/app?sslmode=disable") == \
        "postgresql://app:***@127.0.0.1:5999/app?sslmode=disable"


def test_scrub_covers_the_pieces_a_driver_echoes() -> None:
    from dbevents.masking import add_secrets, forget_secrets, scrub, url_secrets

    add_secrets(url_secrets("postgresql://app:Xy7q@Zsecret99@127.0.0.1:5999/app"))
    try:
        # libpq splits at the first "@" and quotes the rest as the host name.
        assert scrub("failed to resolve host 'Zsecret99@127.0.0.1'") == \
            "failed to resolve host '***@127.0.0.1'"
        assert "Xy7q" not in scrub("password Xy7q@Zsecret99 and Xy7q%40Zsecret99")
    finally:
        forget_secrets()
