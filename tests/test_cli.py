from jaxdetox import cli


def test_help_lists_no_crash(capsys):
    parser = cli.build_parser()
    assert parser.prog == "jaxdetox"
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
