"""The page's logic with Streamlit's AppTest, against a real HTTP server speaking the contract."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from tests.helpers import UI_KEY as KEY
from tests.helpers import UI_PAGE as PAGE
from tests.helpers import free_port, photo
from tests.ui.contract_server import MODEL_VERSION, REGISTRY_DOWN, ContractServer

TIMEOUT_S = 30


def open_page() -> AppTest:
    page = AppTest.from_file(str(PAGE), default_timeout=TIMEOUT_S)
    page.run()
    assert not page.exception, page.exception
    return page


def upload(page: AppTest, *files: tuple[str, bytes, str]) -> AppTest:
    page.file_uploader[0].set_value(list(files)).run()
    assert not page.exception, page.exception
    return page


def texts(elements) -> list[str]:
    return [element.value for element in elements]


def markdown(page: AppTest) -> str:
    return "\n".join(texts(page.markdown))


def test_side_panel_shows_health_model_metrics_and_dashboard_links(contract: ContractServer, ui_env) -> None:
    ui_env(
        contract.url,
        ray_dashboard_url="http://127.0.0.1:8265",
        mlflow_url="http://127.0.0.1:5000",
        grafana_url="http://127.0.0.1:3000",
    )
    page = open_page()
    sidebar = page.sidebar
    assert texts(sidebar.success) == [f"Ready: model version {MODEL_VERSION}"]
    assert f"**Model version:** `{MODEL_VERSION}`" in "\n".join(texts(sidebar.markdown))
    assert f"Serving version `{MODEL_VERSION}` since **09:08:07 UTC** (2026-05-04)" in texts(sidebar.markdown)
    assert {m.label: m.value for m in sidebar.metric} == {
        "accuracy": "0.912",
        "roc_auc": "0.973",
        "tpr_at_1pct_fpr": "0.810",
    }
    assert texts(sidebar.get("link_button")) == ["Ray dashboard", "MLflow", "Grafana"]
    assert sidebar.text_input[0].value == KEY
    assert texts(page.info) == ["Drop one or more product photos above to check them."]
    assert page.file_uploader[0].allowed_type == [".jpg", ".jpeg", ".png", ".webp"]
    assert page.file_uploader[0].accept_multiple_files


def test_an_unreachable_registry_is_told_beside_a_ready_model(contract: ContractServer, ui_env) -> None:
    contract.state.registry_down = True
    ui_env(contract.url)
    sidebar = open_page().sidebar
    assert texts(sidebar.success) == [f"Ready: model version {MODEL_VERSION}"]
    assert texts(sidebar.warning) == [REGISTRY_DOWN]


def test_without_metrics_or_links_the_panel_says_how_to_get_them(contract: ContractServer, ui_env) -> None:
    contract.state.metrics = {}
    ui_env(contract.url)
    page = open_page()
    captions = "\n".join(texts(page.sidebar.caption))
    assert "reports no evaluation metrics" in captions and "AIPD_UI__GRAFANA_URL" in captions
    assert not page.sidebar.get("link_button")


def test_a_batch_gets_verdicts_bars_heatmaps_a_table_and_a_csv(contract: ContractServer, ui_env) -> None:
    ui_env(contract.url)
    page = upload(
        open_page(),
        ("bright.jpg", photo(0.9), "image/jpeg"),
        ("dark.png", photo(0.1, "PNG"), "image/png"),
        ("mid.webp", photo(0.3, "WEBP"), "image/webp"),
    )
    assert texts(page.main.subheader)[-1] == "3 photos: 1 AI-generated, 2 real, 0 refused"
    verdicts = [v for v in texts(page.main.markdown) if v.startswith("### ")]
    assert verdicts == ["### :red[AI-generated]", "### :green[Real photo]", "### :green[Real photo]"]
    bars = list(page.main.get("progress"))
    assert [bar.text.split(":")[0] for bar in bars] == ["Probability AI-generated"] * 3
    assert bars[0].value >= 80 and bars[1].value <= 20
    captions = [caption for image in page.main.image for caption in image.captions]
    assert sum(c.startswith("Grad-CAM over the 64×64 center crop") for c in captions) == 3
    assert "**Confidence:** high" in markdown(page) and "ms round trip" in markdown(page)
    table = page.dataframe[0].value
    assert table["file"].tolist() == ["bright.jpg", "dark.png", "mid.webp"]
    assert table["model_version"].tolist() == [MODEL_VERSION] * 3
    assert page.get("download_button")[0].proto.label == "Download results (CSV)"
    assert contract.state.paths.count("/predict/explain") == 3


def test_a_rerun_never_sends_a_photo_twice(contract: ContractServer, ui_env) -> None:
    ui_env(contract.url)
    page = upload(open_page(), ("bright.jpg", photo(0.9), "image/jpeg"))
    page.run()
    page.sidebar.toggle[0].set_value(False).run()  # heatmaps off: a different question, asked once
    page.sidebar.toggle[0].set_value(True).run()
    assert contract.state.paths.count("/predict/explain") == 1
    assert contract.state.paths.count("/predict/batch") == 1


def test_a_refused_file_shows_the_apis_error_and_the_others_still_answer(contract: ContractServer, ui_env) -> None:
    ui_env(contract.url)
    page = upload(
        open_page(), ("notes.jpg", b"not a photo at all", "image/jpeg"), ("dark.jpg", photo(0.1), "image/jpeg")
    )
    assert texts(page.error) == [
        "Refused by the API (HTTP 400, not_an_image): the file is not an image (checked by its content, not its name)"
    ]
    assert "### :green[Real photo]" in texts(page.markdown)
    assert texts(page.main.subheader)[-1] == "2 photos: 0 AI-generated, 1 real, 1 refused"
    assert page.dataframe[0].value["error"].tolist()[0] == "not_an_image"


def test_a_wrong_key_is_named_and_fixing_it_in_the_side_panel_works(contract: ContractServer, ui_env) -> None:
    ui_env(contract.url, api_key="not-the-key")
    page = upload(open_page(), ("bright.jpg", photo(0.9), "image/jpeg"))
    errors = texts(page.error)
    assert len(errors) == 1 and errors[0].startswith("The API refused the API key: invalid API key in X-API-Key")
    assert not page.dataframe
    page.sidebar.text_input[0].set_value(KEY).run()
    assert not page.error and "### :red[AI-generated]" in texts(page.markdown)


def test_an_api_that_is_down_is_reported_in_the_panel_and_on_upload(ui_env) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    ui_env(url)
    page = open_page()
    assert len(page.sidebar.error) == 1
    assert page.sidebar.error[0].value.startswith(f"Cannot reach the detector API at {url}")
    upload(page, ("bright.jpg", photo(0.9), "image/jpeg"))
    main_errors = [e.value for e in page.main.error]
    assert len(main_errors) == 1 and "aipd serve" in main_errors[0]


def test_a_loading_model_is_a_warning_not_an_error(contract: ContractServer, ui_env) -> None:
    contract.state.ready = False
    ui_env(contract.url)
    page = upload(open_page(), ("bright.jpg", photo(0.9), "image/jpeg"))
    assert texts(page.sidebar.warning) == ["Model loading: the model is loading"]
    assert [w.value for w in page.main.warning] == [
        "The model is not ready: the model is loading; retry in a few seconds"
    ]
    assert not page.error


def test_invalid_settings_are_shown_on_the_page(ui_env, monkeypatch: pytest.MonkeyPatch) -> None:
    ui_env("http://127.0.0.1:1")
    monkeypatch.setenv("AIPD_UI__PORT", "not-a-port")
    page = AppTest.from_file(str(PAGE), default_timeout=TIMEOUT_S).run()
    assert len(page.error) == 1 and page.error[0].value.startswith("The UI settings are invalid")
