"""The user's pipeline API: definition-time errors and the semantics of rounds, loops, tools, phases."""

from __future__ import annotations

from collections import defaultdict

import pytest

from kvmesh.agents import (
    Agent,
    DocumentStore,
    Phase,
    Pipeline,
    PipelineError,
    Segment,
    Tool,
    ToolError,
    chain,
    debate,
    fan_out_in,
    fully_connected,
    run_locally,
    self_refine,
    tool,
)
from kvmesh.agents.errors import InvalidTextError


class Recorder:
    """A stand-in LLM for graph semantics: answers '<name>#<call>' and remembers every prompt."""

    def __init__(self) -> None:
        self.prompts: dict[str, list[str]] = defaultdict(list)

    def __call__(self, agent, prompt) -> str:
        self.prompts[agent.name].append(prompt.user_text)
        return f"{agent.name}#{len(self.prompts[agent.name])}"


# -- definition-time errors ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Pipeline("p", [Agent("a", "{query} {nobody}")]), "{nobody} names nothing"),
        (lambda: Pipeline("p", [Agent("a"), Agent("a")]), "two agents are named 'a'"),
        (lambda: Pipeline("p", [Agent("a", "{query}{b}"), Agent("b", "{a}")]), r"a -> b -> a.*\{agent.prev\}"),
        (lambda: Pipeline("p", [Agent("a"), Agent("lonely", "Say hi.")]), r"nothing reaches \['lonely'\]"),
        (lambda: Pipeline("p", [Agent("a", "{query} {a.prev}")]), "runs one round"),
        (lambda: Pipeline("p", [Agent("a")], until=lambda o: True), "needs max_iters"),
        (lambda: Pipeline("p", [Agent("a")], rounds=0), "rounds must be >= 1"),
        (lambda: Pipeline("p", [Agent("j", "{query}", runs="last"), Agent("a", "{j}")]), "runs only after the rounds"),
        (lambda: Pipeline("p", [Agent("a")], tools=[Tool("a", lambda query: query)]), "both an agent and a tool"),
        (lambda: Pipeline("p", [Agent("a"), Agent("b")], outputs=["a"]), r"\['b'\] feed none of the outputs"),
        (lambda: Pipeline("p", [Agent("a")], outputs=["z"]), r"outputs \['z'\] are not agents"),
        (lambda: Agent("a", "{query} {"), "malformed"),
        (lambda: Agent("a", "{0}"), "is not a name"),
        (lambda: Agent("bad name"), "must be a Python identifier"),
        (lambda: Agent("a", reuse="magic"), "reuse='magic'; choose one of auto, dense, prefix, kvcomm, blend$"),
        (lambda: Agent("a", reuse="naive"), "reuse='naive'"),  # for benchmarks: the worker takes it, users may not
        (lambda: Agent("a", temperature=-1), "temperature"),
        # sampling fields: the engine's ranges and the wire's (max_tokens uint32, seed uint64), named here
        (lambda: Agent("a", max_tokens=2**32), r"agent 'a': max_tokens must be an integer in \[1, 4294967295\]"),
        (lambda: Agent("a", max_tokens=0), r"max_tokens must be an integer in \[1, 4294967295\], got 0"),
        (lambda: Agent("a", seed=-1), r"agent 'a': seed must be None or an integer in \[0, 2\*\*64 - 1\], got -1"),
        (lambda: Agent("a", seed=2**64), r"seed must be None or an integer in \[0, 2\*\*64 - 1\]"),
        (lambda: Agent("a", temperature=float("inf")), r"temperature must be a finite number >= 0.*got inf"),
        (lambda: Agent("a", temperature=float("nan")), r"temperature must be a finite number >= 0.*got nan"),
        (lambda: Agent("a", temperature="0.5"), "temperature must be a finite number"),
        (lambda: Agent("a", top_p=0), r"top_p must be in \(0, 1\], got 0"),
        (lambda: Agent("a", top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (lambda: Agent("a", top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
        (lambda: Agent("a", stop=("",)), "stop strings must be non-empty"),
        (lambda: Agent("a", "Q: \ud800 {query}"), r"agent 'a': template is not valid Unicode: .* U\+D800 at"),
        (lambda: Agent("a", system="\udcff"), "agent 'a': system is not valid Unicode"),
        (lambda: Tool("t", lambda *args: ""), r"\*args"),
    ],
)
def test_mistakes_are_caught_when_the_pipeline_is_built(build, message):
    with pytest.raises(PipelineError, match=message):
        build()


def echo(agent, prompt) -> str:
    return prompt.user_text


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (None, "tool 't' returned a value of type NoneType; return a str"),
        ({"k": "v"}, "tool 't' returned a value of type dict; return a str"),
        (3, "tool 't' returned a value of type int"),
        (["ok", None], "tool 't' returned a list whose item 1 is of type NoneType; return a str"),
        ("bad \udcff", "the output of tool 't' is not valid Unicode: a lone surrogate U\\+DCFF at character 4"),
        (["ok", "\ud800"], "item 1 of the output of tool 't' is not valid Unicode"),
    ],
)
def test_a_tool_must_return_text(returned, message):
    pipeline = Pipeline("p", [Agent("a", "{t} {query}")], tools=[Tool("t", lambda query: returned)])
    with pytest.raises(ToolError, match=message):
        run_locally(pipeline, "q", echo)


def test_text_that_is_not_valid_unicode_is_refused_where_it_enters():
    pipeline = Pipeline("p", [Agent("a", "Q: {query}"), Agent("b", "{a}")])
    with pytest.raises(InvalidTextError, match=r"the query is not valid Unicode: a lone surrogate U\+DCFF at char"):
        run_locally(pipeline, "why\udcff", echo)
    with pytest.raises(InvalidTextError, match="the output of agent 'a' is not valid Unicode"):
        run_locally(pipeline, "why", lambda agent, prompt: "\ud800")
    assert run_locally(pipeline, "why \u00e9\U0001f600", echo).outputs == {"b": "Q: why \u00e9\U0001f600"}


# -- semantics ---------------------------------------------------------------------------------------
def test_a_chain_passes_each_output_on_as_a_segment():
    llm = Recorder()
    pipeline = Pipeline("c", [Agent("c", "fix {b}"), Agent("a", "plan {query}"), Agent("b", "code {a}")])
    result = run_locally(pipeline, "sort a list", llm)
    assert llm.prompts == {"a": ["plan sort a list"], "b": ["code a#1"], "c": ["fix b#1"]}
    assert result.outputs == {"c": "c#1"} and result.rounds == 1


def test_rounds_read_the_previous_round_and_start_empty():
    llm = Recorder()
    pipeline = Pipeline("r", [Agent("x", "{query}|{y.prev}"), Agent("y", "{query}|{x.prev}|{x}")], rounds=3)
    result = run_locally(pipeline, "q", llm)
    assert llm.prompts["x"] == ["q|", "q|y#1", "q|y#2"]
    assert llm.prompts["y"] == ["q||x#1", "q|x#1|x#2", "q|x#2|x#3"]
    assert result.history == [{"x": "x#1", "y": "y#1"}, {"x": "x#2", "y": "y#2"}, {"x": "x#3", "y": "y#3"}]


def test_until_stops_the_loop_early_and_max_iters_bounds_it():
    def approve_second_time(outputs):
        return outputs["critic"] == "critic#2"

    loop = self_refine("s", ("writer", "Write."), ("critic", "Review."), until=approve_second_time, max_iters=5)
    result = run_locally(loop, "a poem", Recorder())
    assert result.rounds == 2 and result.outputs == {"writer": "writer#2"}
    capped = self_refine("s", ("writer", "Write."), ("critic", "Review."), until=lambda o: False, max_iters=3)
    assert run_locally(capped, "a poem", Recorder()).rounds == 3


def test_first_agents_run_once_and_last_agents_read_the_final_round():
    llm = Recorder()
    pipeline = Pipeline(
        "phases",
        [
            Agent("plan", "{query}", runs="first"),
            Agent("work", "{plan}/{work.prev}"),
            Agent("report", "{work}", runs="last"),
        ],
        rounds=2,
    )
    result = run_locally(pipeline, "q", llm)
    assert llm.prompts == {"plan": ["q"], "work": ["plan#1/", "plan#1/work#1"], "report": ["work#2"]}
    assert result.outputs == {"report": "report#1"}


def test_tools_fill_placeholders_from_what_they_read():
    docs = {"paris": "Paris is the capital of France."}

    @tool
    def search(query):
        return docs[query.lower()]

    llm = Recorder()
    pipeline = Pipeline("rag", [Agent("answer", "Context: {search}\nQ: {query}")], tools=[search])
    run_locally(pipeline, "Paris", llm)
    assert llm.prompts["answer"] == ["Context: Paris is the capital of France.\nQ: Paris"]
    with pytest.raises(ToolError, match="tool 'search' failed: KeyError"):
        run_locally(pipeline, "Rome", llm)


def test_placeholders_become_segments_naming_their_producer():
    seen = []
    pipeline = Pipeline("s", [Agent("a", "Q: {query}."), Agent("b", "A said {a}; Q: {query}")])
    run_locally(pipeline, "why", lambda agent, prompt: seen.append(prompt) or "same text")
    segments = [part for prompt in seen for part in prompt.parts if isinstance(part, Segment)]
    assert [(s.placeholder, s.producer, s.text) for s in segments] == [
        ("query", "query", "why"),
        ("a", "a", "same text"),
        ("query", "query", "why"),
    ]


def test_topology_helpers_wire_the_expected_graphs():
    llm = Recorder()
    result = run_locally(chain("c", {"planner": "Plan.", "coder": "Code {it}."}), "task", llm)
    assert "coder wrote" not in llm.prompts["planner"][0] and "planner wrote:\nplanner#1" in llm.prompts["coder"][0]
    assert "Code {it}." in llm.prompts["coder"][0] and result.outputs == {"coder": "coder#1"}

    fan = fan_out_in("f", {"w1": "A.", "w2": "B."}, ("boss", "Merge."))
    assert fan.upstream("boss", Phase(0)) == ["w1", "w2"] and fan.order(Phase(0))[-1] == "boss"

    llm = Recorder()
    result = run_locally(debate("d", {"pro": "For.", "con": "Against."}, ("judge", "Decide."), rounds=2), "q", llm)
    assert len(llm.prompts["pro"]) == 2 and "con wrote:\ncon#1" in llm.prompts["pro"][1]
    assert "pro wrote:\npro#2" in llm.prompts["judge"][0] and result.outputs == {"judge": "judge#1"}

    ring = fully_connected("r", {"a": "A.", "b": "B.", "c": "C."}, rounds=2)
    assert set(ring.outputs) == {"a", "b", "c"}


def test_a_document_store_retrieves_chunks_that_land_as_separate_segments():
    store = DocumentStore(chunk_words=8)
    store.add("Veltra is a mountain town. Its mayor is Anna Korsak. The river Sella flows through it.", "veltra")
    store.add("Morrow lies by the sea. Its mayor is Boris Varga. Fishing boats fill its harbor.", "morrow")
    assert len(store.chunks) == 4  # each document split after the sentence that passes 8 words
    best = store.search("Who is the mayor of Morrow?", k=2)
    assert best[0].doc_id == "morrow" and "Boris Varga" in best[0].text
    seen = []
    pipeline = Pipeline("rag", [Agent("reader", "{docs}\n\nQ: {query}")], tools=[store.retriever("docs", k=2)])
    run_locally(pipeline, "Who is the mayor of Morrow?", lambda agent, prompt: seen.append(prompt) or "ok")
    segments = [p for p in seen[0].parts if isinstance(p, Segment)]
    assert [s.text for s in segments[:2]] == [c.text for c in best] and segments[2].producer == "query"
    assert all(s.producer == "docs" for s in segments[:2])
