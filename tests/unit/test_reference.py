"""Image references: Shifter's TYPE:TAG form and Docker's naming rules."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shifter_core.errors import OptionError
from shifter_core.reference import DockerReference, ImageRequest

HEX = "a" * 64


@pytest.mark.parametrize(
    "text, registry, repository, tag, digest",
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("nersc/app:1", "docker.io", "nersc/app", "1", None),
        ("docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("registry-1.docker.io/library/ubuntu:1", "docker.io", "library/ubuntu", "1", None),
        (
            "127.0.0.1:5000/library/busybox:latest",
            "127.0.0.1:5000",
            "library/busybox",
            "latest",
            None,
        ),
        ("localhost/x/y:z", "localhost", "x/y", "z", None),
        ("quay.io/a/b@sha256:" + HEX, "quay.io", "a/b", None, "sha256:" + HEX),
        ("a/b:t@sha256:" + HEX, "docker.io", "a/b", "t", "sha256:" + HEX),
    ],
)
def test_docker_naming(text, registry, repository, tag, digest):
    ref = DockerReference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert ref.reference == (digest or tag)


@pytest.mark.parametrize(
    "text", ["Ubuntu", "ubuntu:", "bad image!", "a//b", "ubuntu@sha256:abc", "-x", "a:b:c", "x/"]
)
def test_bad_docker_references_are_refused(text):
    with pytest.raises(OptionError, match="invalid image reference"):
        DockerReference.parse(text)


@pytest.mark.parametrize(
    "text, type_, tag",
    [
        ("docker:ubuntu:22.04", "docker", "ubuntu:22.04"),
        ("ubuntu:22.04", "docker", "ubuntu:22.04"),
        ("busybox", "docker", "busybox"),
        ("id:" + HEX, "id", HEX),
        ("id:sha256:" + HEX, "id", HEX),
        ("localhost:5000/a:b", "docker", "localhost:5000/a:b"),
    ],
)
def test_image_requests(text, type_, tag):
    request = ImageRequest.parse(text)
    assert (request.type, request.tag) == (type_, tag)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty image name"),
        ("   ", "empty image name"),
        ("docker:", "empty image name"),
        ("bad image!", "white space"),
        ("ubuntu\n", "white space"),
        ("custom:foo", "not supported"),
        ("id:xyz", "invalid image id"),
        ("docker:UBUNTU", "invalid image reference"),
    ],
)
def test_bad_image_requests_say_what_is_wrong(text, message):
    with pytest.raises(OptionError, match=message):
        ImageRequest.parse(text)


_component = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8}){0,2}", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(st.lists(_component, min_size=1, max_size=3), st.one_of(st.none(), _tag))
def test_valid_names_round_trip(components, tag):
    text = "/".join(components) + (f":{tag}" if tag else "")
    ref = DockerReference.parse(text)
    assert DockerReference.parse(str(ref)) == ref
    assert ref.tag == (tag or "latest")
    assert ref.repository.endswith(
        "/".join(components[1:]) if len(components) > 1 else components[0]
    )


@given(st.text(max_size=40))
def test_parser_never_crashes(text):
    try:
        request = ImageRequest.parse(text)
    except OptionError as err:
        assert str(err)
    else:
        assert request.type in ("docker", "id")
        assert not any(ch.isspace() for ch in request.tag)


# -- bounds (issue 9) -----------------------------------------------------------------------

from shifter_core.reference import MAX_REFERENCE_LENGTH  # noqa: E402


def test_over_long_references_are_refused_at_once_with_a_cut_message():
    for text in ("a" * 100_000, "docker:" + "a/" * 50_000 + "a", "a:" + "t" * 100_000):
        with pytest.raises(OptionError, match="longer than") as info:
            ImageRequest.parse(text)
        assert len(str(info.value)) < 400
    assert MAX_REFERENCE_LENGTH == 512


def test_name_and_tag_limits():
    # distribution/reference counts the repository path without the registry (since
    # distribution/reference#9), after Docker Hub's normalisation: "library/" counts.
    name = "a" * 247
    assert ImageRequest.parse(name).docker.repository == "library/" + name
    with pytest.raises(OptionError, match="255"):
        ImageRequest.parse("a" * 248)
    path = "a" * 255
    assert DockerReference.parse(f"registry.example.org:5000/{path}").repository == path
    with pytest.raises(OptionError, match="255"):
        DockerReference.parse(f"registry.example.org:5000/{path}a")
    assert ImageRequest.parse("a:" + "t" * 128).docker.tag == "t" * 128
    with pytest.raises(OptionError, match="invalid image reference"):
        ImageRequest.parse("a:" + "t" * 129)


@pytest.mark.parametrize("text", ["ubuntu\0", "ubu\x1bntu", "ubuntu:22.04\u202e", "ubuntu:١"])
def test_control_and_non_ascii_characters_are_refused(text):
    with pytest.raises(OptionError) as info:
        ImageRequest.parse(text)
    message = str(info.value)
    assert all(ch.isprintable() for ch in message)


@given(st.text(max_size=600))
def test_image_request_parser_gives_a_request_or_an_option_error(text):
    try:
        request = ImageRequest.parse(text)
    except OptionError as err:
        assert len(str(err)) < 1000
    else:
        assert len(request.tag) <= MAX_REFERENCE_LENGTH
        assert request.tag.isascii() and request.tag.isprintable()


_COMPONENT = st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)
_HOST = st.one_of(
    st.sampled_from(
        ["", "docker.io/", "index.docker.io/", "localhost/", "Reg/", "r.example:5000/", "a.b/"]
    ),
    st.from_regex(r"\[[a-fA-F0-9:]{1,16}\](?::[0-9]{1,5})?/", fullmatch=True),
)


@given(
    _HOST,
    st.lists(_COMPONENT, min_size=1, max_size=3),
    st.sampled_from(["", ":v1", ":latest"]),
    st.sampled_from(["", "@sha256:" + "ab" * 32, "@sha512:" + "cd" * 64]),
)
def test_the_submission_names_an_image_as_the_parser_does(host, parts, tag, digest):
    """``hubnames.canonical`` (srun's check of a job's image, no regex) gives what the
    parser gives: one naming rule, written once."""
    from shifter_core.hubnames import canonical

    text = host + "/".join(parts) + tag + digest
    assert canonical(text) == str(DockerReference.parse(text))


# -- the distribution/reference grammar, as it is today (issue 11) --------------------------


@pytest.mark.parametrize(
    "text, registry, repository",
    [
        ("[2001:db8::1]:5000/repo", "[2001:db8::1]:5000", "repo"),
        ("[::1]/a/b:v1", "[::1]", "a/b"),
        ("[fe80::1:2]:443/x", "[fe80::1:2]:443", "x"),
        ("[2001:DB8::1]/nersc/app", "[2001:DB8::1]", "nersc/app"),
    ],
)
def test_ipv6_registry_hosts(text, registry, repository):
    from shifter_core.hubnames import canonical

    ref = DockerReference.parse(text)
    assert (ref.registry, ref.repository) == (registry, repository)
    assert DockerReference.parse(str(ref)) == ref
    assert canonical(text) == str(ref)
    assert ImageRequest.parse(text).docker == ref


@pytest.mark.parametrize(
    "text", ["[2001:db8::1%eth0]/a", "[]/a", "[::1]", "[::1]:/a", "[g::1]/a", "2001:db8::1/a"]
)
def test_malformed_ipv6_hosts_are_refused(text):
    with pytest.raises(OptionError, match="invalid image reference"):
        DockerReference.parse(text)


@pytest.mark.parametrize("digest", ["sha256:" + "0f" * 32, "sha512:" + "0f" * 64])
def test_supported_digests(digest):
    assert DockerReference.parse(f"a/b@{digest}").digest == digest
    assert DockerReference.parse(f"a/b:t@{digest}").digest == digest


@pytest.mark.parametrize(
    "digest, message",
    [
        ("sha256:" + "0f" * 31, "64 lower-case hexadecimal digits"),
        ("sha256:" + "0f" * 33, "64 lower-case hexadecimal digits"),
        ("sha256:" + "0F" * 32, "64 lower-case hexadecimal digits"),
        ("sha512:" + "0f" * 32, "128 lower-case hexadecimal digits"),
        ("md5:" + "0f" * 16, "unsupported digest algorithm 'md5'"),
        ("sha256+b64:" + "0f" * 32, "unsupported digest algorithm 'sha256+b64'"),
        ("SHA256:" + "0f" * 32, "unsupported digest algorithm 'SHA256'"),
    ],
)
def test_digests_are_checked_for_algorithm_and_length(digest, message):
    with pytest.raises(OptionError, match="invalid image reference") as info:
        DockerReference.parse(f"a/b@{digest}")
    assert message in str(info.value)
    assert info.value.hint


def test_a_short_digest_says_what_a_digest_is():
    with pytest.raises(OptionError, match="invalid image reference") as info:
        DockerReference.parse("ubuntu@sha256:abc")
    assert "sha256:" in (info.value.hint or "")


@pytest.mark.parametrize("text", [HEX, "docker:" + HEX])
def test_a_bare_image_id_is_refused_with_a_hint(text):
    with pytest.raises(OptionError, match="image id") as info:
        ImageRequest.parse(text)
    assert f"id:{HEX}" in (info.value.hint or "")


def test_hex_names_that_are_not_an_id_are_names():
    # distribution refuses exactly 64 lower-case hex digits, nothing else
    for text in ("a" * 63, "a" * 65, HEX + ":v1", "x/" + HEX):
        assert ImageRequest.parse(text).type == "docker"
    assert ImageRequest.parse("id:" + HEX).tag == HEX


@given(
    st.sampled_from(["", "docker:", "id:", "id:sha256:"]),
    st.from_regex(r"[a-f0-9]{64}|[a-z0-9]{1,8}(/[a-z0-9]{1,8})?(:[a-z0-9.]{1,8})?", fullmatch=True),
)
def test_a_jobs_request_is_read_back_as_the_parser_reads_it(kind, text):
    """submit.canonical_request (every srun of a job, no grammar) agrees with the parser on
    what the job's --image, checked at submission, asks for."""
    from shifter_core.slurm import submit
    from shifter_core.slurm.state import state

    try:
        expected = str(ImageRequest.parse(kind + text))
    except OptionError:
        return  # refused at submission: never read back
    state.config = type("Site", (), {"default_image_type": "docker"})()  # type: ignore[assignment]
    try:
        assert submit.canonical_request(kind + text) == expected
    finally:
        state.config = None
